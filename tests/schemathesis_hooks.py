"""What the schemathesis run (tests/schemathesis.toml) knows that the document says only in words.

JSON Schema cannot compare two fields or look a password up in a list, so
the document states those rules in prose (and answers 422 when they are
broken). A generator that does not know them sends "valid" requests the
server rightly refuses; these hooks keep each generated request within the
prose rules, using the server's own code where it has one, and never touch
what the schemas decide. They also keep the run from ending its own session
(the brief's one exclusion), request by request instead of operation by
operation:

* ``ends_on`` not before ``starts_on`` (`ProjectIn.rules`, `ProjectPatch.rules`):
  swapped, or completed for a merge patch, when both are dates;
* one ``Idempotency-Key`` per request, as clients use them (a key reused for
  another request is a documented 422): a well-formed key is made unique;
* registration's password rules (`core.passwords.password_problems`): a
  password of the right length that breaks one is replaced;
* the run's own account and session (the ``sub`` and ``sid`` of
  ``FUZZ_TOKEN``, its bearer token) are neither deleted nor patched (its
  e-mail is its login): such a request is sent for an id that names nothing,
  and answered 404;
* ``If-Match``: a well-formed ETag in a valid write (outside the stateful
  phase, whose links carry the ETags they read) is made the project's current
  one, as a client sends the version it read; a made-up version is a stale
  one, refused with 412 as documented, and a run that only ever sends stale
  ones never sees a write succeed;
* credentials: a valid login or refresh request (outside the stateful phase,
  whose links carry real ones) is sent with the run's account
  (``FUZZ_EMAIL``, ``FUZZ_PASSWORD``) or a refresh token of a fresh login of
  it, so that accepting them is tested; made-up credentials are only ever
  refused (400 ``invalid_grant``), which the document says and teaches nothing.

The hooks run in schemathesis' process, right before each request; the
sent values are revalidated against the schema afterwards, so a request
they change is judged as what it is.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import uuid
from collections.abc import MutableMapping
from typing import Any

import requests
import schemathesis
from schemathesis import GenerationMode

from core.idempotency import IDEMPOTENCY_KEY_SCHEMA
from core.passwords import password_problems

_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_KEY = re.compile(str(IDEMPOTENCY_KEY_SCHEMA["pattern"]))
#: The largest row id the document allows, and names nothing here.
_NO_ROW = "999999999999999999"
#: The writes that take If-Match.
_CONDITIONAL = ("PUT /api/projects/{id}", "PATCH /api/projects/{id}", "DELETE /api/projects/{id}")
#: Deleting the run's account ends its session; patching it may change the e-mail it logs in with.
_OWN_ACCOUNT = ("DELETE /api/users/{id}", "PATCH /api/users/{id}")


def _claims() -> dict[str, Any]:
    token = os.environ.get("FUZZ_TOKEN", "")
    if token.count(".") != 2:
        return {}
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


_OWN = _claims()


def _date(value: Any) -> dt.date | None:
    if not isinstance(value, str) or not _DATE.match(value):
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        return None


def _order_dates(body: MutableMapping[str, Any], patch: bool) -> None:
    if patch:
        if "starts_on" in body and "ends_on" not in body and _date(body["starts_on"]):
            body["ends_on"] = None
        if "ends_on" in body and "starts_on" not in body and _date(body["ends_on"]):
            body["starts_on"] = body["ends_on"]
    starts, ends = _date(body.get("starts_on")), _date(body.get("ends_on"))
    if starts and ends and ends < starts:
        body["starts_on"], body["ends_on"] = body["ends_on"], body["starts_on"]


def _strong_password(body: MutableMapping[str, Any]) -> None:
    password, email = body.get("password"), body.get("email")
    if not isinstance(password, str) or not 8 <= len(password) <= 1024:
        return
    if password_problems(password, email if isinstance(email, str) else None):
        body["password"] = f"fuzzing {uuid.uuid4().hex}"


def _spare_own(case: Any, operation: str) -> None:
    params = case.path_parameters
    if not params or "id" not in params:
        return
    target = str(params["id"])
    if operation in _OWN_ACCOUNT and target == str(_OWN.get("sub")):
        params["id"] = _NO_ROW
    elif operation == "DELETE /api/auth/sessions/{id}" and target == _OWN.get("sid"):
        params["id"] = str(uuid.uuid4())


def _login(case: Any) -> dict[str, Any]:
    """Tokens of a fresh login of the run's account."""
    form = {"grant_type": "password", "username": os.environ.get("FUZZ_EMAIL", ""),
            "password": os.environ.get("FUZZ_PASSWORD", "")}  # fmt: skip
    url = case.operation.schema.get_base_url().rstrip("/") + "/api/auth/token"
    response = requests.post(url, data=form, timeout=10)
    response.raise_for_status()  # the run's account must log in: a broken setup fails loudly
    tokens: dict[str, Any] = response.json()
    return tokens


def _generated_valid(case: Any) -> bool:
    """A valid request made up by the generator (not one a stateful link built)."""
    meta = case.meta
    return (
        meta is not None
        and meta.generation.mode == GenerationMode.POSITIVE
        and meta.phase.name.value != "stateful"
    )


def _current_version(case: Any, operation: str) -> None:
    headers, params = case.headers, case.path_parameters
    if operation not in _CONDITIONAL or not isinstance(headers, MutableMapping) or not params:
        return
    tag = headers.get("If-Match")
    if not isinstance(tag, str) or tag == "*" or not _generated_valid(case):
        return
    url = f"{case.operation.schema.get_base_url().rstrip('/')}/api/projects/{params['id']}"
    auth = {"Authorization": f"Bearer {os.environ.get('FUZZ_TOKEN', '')}"}
    current = requests.get(url, headers=auth, timeout=10)
    if current.status_code == 200:
        weak = "W/" if tag.startswith("W/") else ""
        headers["If-Match"] = weak + current.headers["ETag"]


def _live_credentials(case: Any, body: MutableMapping[str, Any], operation: str) -> None:
    if not _generated_valid(case) or "FUZZ_EMAIL" not in os.environ:
        return
    if operation == "POST /api/auth/token" and body.get("grant_type") == "password":
        body["username"] = os.environ["FUZZ_EMAIL"]
        body["password"] = os.environ.get("FUZZ_PASSWORD", "")
    elif operation == "POST /api/auth/refresh" or (
        operation == "POST /api/auth/token" and body.get("grant_type") == "refresh_token"
    ):
        body["refresh_token"] = _login(case)["refresh_token"]


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    operation = f"{case.operation.method.upper()} {case.operation.path}"
    body = case.body
    if isinstance(body, MutableMapping):
        if operation in ("POST /api/projects", "PUT /api/projects/{id}"):
            _order_dates(body, patch=False)
        elif operation == "PATCH /api/projects/{id}":
            _order_dates(body, patch=True)
        elif operation == "POST /api/auth/register":
            _strong_password(body)
        else:
            _live_credentials(case, body, operation)
    headers = case.headers
    if isinstance(headers, MutableMapping):
        key = headers.get("Idempotency-Key")
        if isinstance(key, str) and _KEY.match(key):
            headers["Idempotency-Key"] = str(uuid.uuid4())
    _current_version(case, operation)
    _spare_own(case, operation)
