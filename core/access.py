"""Who may call a route, and act on its object: one rule per route, in the route table.

Every `Route` names an `Access` rule. `Core.dispatch` enforces the part a
rule decides from the caller and the path alone (`check`); a rule about a
stored object (`OWNER`) is finished by its handler, which calls
`require_owner` with the row it loaded and locked, in the same transaction
as the write.

Callers, by their verified identity:

* an *admin*: a token with ``role: admin``;
* a *user*: any other token; a token issued here has ``sub`` = its users row id;
* a *service*: an API key (``role: service``); without its ``rest`` flag it
  may call no route that needs a token.

The rules (docs/security.md has the table per route):

* ``PUBLIC``: anyone, no token (registration, login, refresh).
* ``SESSION``: a user or admin token from a login here (claim ``sid``), on
  that login's own sessions; 403 for API keys and tokens from elsewhere.
* ``READ``: any caller with a token, on the shared project board.
* ``OWNER``: admins and services on any object; a user only on objects whose
  ``owner_email`` is their own e-mail, before and after the write; else 403.
* ``SELF``: a user's own account (``{id}`` = their ``sub``); admins on any;
  another user's id answers 404 exactly like a missing one (no enumeration);
  services 403 (accounts are not a service's business). A collection under
  ``SELF`` lists only the caller's own row for a non-admin.
* ``ADMIN``: admins only; 403 for everyone else.
* ``SERVER``: admins, and API keys with the ``server`` scope; 403 for
  everyone else (the gateway's server API, ``/api/server/``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from core.db import Queryable
from core.infra.errors import ApiError, NotFound
from core.request import Caller

__all__ = [
    "Access",
    "check",
    "is_admin",
    "privileged",
    "require_creator",
    "require_owner",
    "user_id",
]


class Access(enum.Enum):
    PUBLIC = "public"
    SESSION = "session"
    READ = "read"
    OWNER = "owner"
    SELF = "self"
    ADMIN = "admin"
    SERVER = "server"


def _role(caller: Caller | None) -> str | None:
    """The caller's role as the core honours it: a token from an outside identity
    provider (not signed with this deployment's keys) is a plain user, whatever it says."""
    if caller is None:
        return None
    role = getattr(caller, "role", None)
    return role if getattr(caller, "local", True) else "user"


def is_admin(caller: Caller | None) -> bool:
    return _role(caller) == "admin"


def privileged(caller: Caller | None) -> bool:
    """Admins and services act on any object an `OWNER` rule guards."""
    return _role(caller) in ("admin", "service")


def user_id(caller: Caller | None) -> int | None:
    """The caller's users row id (tokens issued here), or None (keys, foreign tokens)."""
    if caller is None or _role(caller) == "service" or not getattr(caller, "local", True):
        return None
    sub = caller.sub
    # ASCII digits: int() also reads other scripts' digits ("١٢" is 12)
    return int(sub) if sub.isascii() and sub.isdigit() and len(sub) <= 18 else None


def check(access: Access, caller: Caller, params: Mapping[str, str]) -> None:
    """Refuse an authenticated ``caller`` the rule refuses before any object is loaded."""
    role = _role(caller)
    if access is Access.ADMIN:
        if role != "admin":
            raise ApiError(403, "forbidden", "admins only")
    elif access is Access.SERVER:
        if role != "admin" and not (role == "service" and getattr(caller, "server", False)):
            raise ApiError(403, "forbidden", "admins and API keys with the server scope only")
    elif access is Access.SESSION:
        if getattr(caller, "sid", None) is None or user_id(caller) is None:
            raise ApiError(403, "no_session", "this token was not issued by a login here")
    elif access is Access.SELF:
        if role == "service":
            raise ApiError(403, "forbidden", "API keys may not act on accounts")
        target = params.get("id")
        if target is not None and role != "admin" and target != str(user_id(caller)):
            raise NotFound(f"no user {target[:40]}")


#: The row of project $1 if user $2 owns it and stays its owner ($3: the new owner, or null),
#: locked. Only an owner's row is locked: a refused caller takes no lock, so another user's
#: writes never wait behind it (before, 250 refused PATCHes of her project, each locking the
#: row in turn, held the owner's own PATCH 0.6 s and as many pool connections as they could).
_OWNS = """
select true from projects p join users u on u.id = $2
where p.id = $1 and lower(p.owner_email) = lower(u.email)
  and lower(coalesce($3::text, p.owner_email)) = lower(u.email)
for update of p
"""
_EXISTS = "select true from projects where id = $1"
#: Whether $2 is user $1's e-mail, and how many projects it owns, counted up to $3 on the
#: ``lower(owner_email)`` index (one round trip for both).
_IS_ME = """
select lower(u.email) = lower($2::text),
       (select count(*) from (select 1 from projects
                              where lower(owner_email) = lower($2::text) limit $3) p)
from users u where u.id = $1
"""


async def require_creator(conn: Queryable, caller: Caller | None, owner: str, most: int) -> None:
    """403 unless ``caller`` may create a project owned by ``owner`` (its own e-mail);
    409 when it owns ``most`` already (`MAX_PROJECTS_PER_USER`; 0: no limit).

    Admins and services pass without a query; a user's creation costs one.
    Creations under way at once may pass ``most`` by as many as they are.
    """
    if privileged(caller):
        return
    me = user_id(caller)
    row = None if me is None else await conn.fetchrow(_IS_ME, me, owner, most)
    if row is None or not row[0]:
        raise ApiError(403, "forbidden", "owner_email must be your own e-mail")
    if most and row[1] >= most:
        raise ApiError(409, "limit_reached", f"you own {most} projects, the most a user may: "
                       "delete one")  # fmt: skip


async def require_owner(
    conn: Queryable,
    caller: Caller | None,
    project: int,
    new_owner: str | None,
) -> None:
    """403 unless ``caller`` may write: its own ``project`` (locked here) and ``new_owner``.

    ``new_owner`` is None when the write keeps the owner. Call it inside the
    write's transaction: the row stays locked until the write commits.
    Admins and services pass without a query. A missing project is 404.
    """
    if privileged(caller):
        return
    me = user_id(caller)
    if await conn.fetchval(_OWNS, project, me, new_owner):
        return
    if await conn.fetchval(_EXISTS, project) is None:
        raise NotFound("no such project")
    raise ApiError(
        403, "forbidden", "only the owner or an admin may change a project, or its owner"
    )
