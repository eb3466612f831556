"""Request and response types of the REST core (msgspec), and their rules.

These types validate requests and are the source of the OpenAPI schemas.
Responses are built by PostgreSQL (``project_json``/``user_json`` in the
migrations) in exactly the shapes `Project` and `User` declare; a test
checks real responses against these types.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, ClassVar, Final, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from core.infra.errors import ErrorDetail
from core.paging import CURSOR_PATTERN
from core.validation import Checked

__all__ = [
    "BUDGET_MAX",
    "Amount",
    "Milestone",
    "Page",
    "Project",
    "ProjectIn",
    "ProjectPage",
    "ProjectPatch",
    "ProjectQuery",
    "User",
    "UserIn",
    "UserPage",
    "UserPatch",
    "UserQuery",
]

BUDGET_MAX: Final = Decimal(1_000_000_000)
_CENT: Final = Decimal("0.01")

#: An addr-spec with a dot-atom local part of at most 64 characters (RFC 5322
#: §3.4.1, RFC 5321 §4.5.3.1.1; no quoted strings) and a domain of LDH labels with at least one dot: ASCII only.
EMAIL_PATTERN: Final = (
    r"^(?=[^@]{1,64}@)[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+(?![\s\S])"
)
#: PostgreSQL text cannot hold NUL; refuse it at the door, documented. Every
#: pattern ends with ``(?![\s\S])`` (end of text in Python and ECMA-262 alike;
#: ``$`` would also match before a final newline): see proto.frames.CHANNEL_PATTERN.
NO_NUL: Final = r"^[^\x00]*(?![\s\S])"

Email = Annotated[
    str,
    Meta(
        min_length=3,
        max_length=254,
        pattern=EMAIL_PATTERN,
        extra_json_schema={"format": "email"},
        examples=["ada@example.com"],
    ),
]
Name = Annotated[str, Meta(min_length=1, max_length=200, pattern=NO_NUL)]
Description = Annotated[str, Meta(max_length=5000, pattern=NO_NUL)]
Tag = Annotated[str, Meta(min_length=1, max_length=40, pattern=NO_NUL)]
Tags = Annotated[list[Tag], Meta(max_length=20)]
Status = Literal["draft", "active", "done"]
#: A budget as the server stores it: numeric(12, 2), 0 to 1e9.
BUDGET_NUMBER: Final = {"type": "number", "minimum": 0, "maximum": int(BUDGET_MAX),
                        "multipleOf": 0.01, "examples": [12500.5]}  # fmt: skip
#: The same as text: at most two decimal places, 0 to 1000000000(.00).
BUDGET_TEXT: Final = (
    r"^(?:1000000000(?:\.0{1,2})?|(?:0|[1-9][0-9]{0,8})(?:\.[0-9]{1,2})?)(?![\s\S])"
)
_BUDGET_TEXT = re.compile(BUDGET_TEXT)


class Amount(Decimal):
    """A budget as a client sends it: a JSON number (read exactly, never as a binary
    float), or a string in `BUDGET_TEXT` form. msgspec hands the raw value to
    `from_json` (core/validation.py), so strings are held to the documented form."""

    @classmethod
    def from_json(cls, value: object) -> Amount:
        if isinstance(value, str):
            if not _BUDGET_TEXT.match(value):
                raise ValueError("a budget as text is digits with at most two decimal places")
            return cls(value)
        if isinstance(value, int | Decimal) and not isinstance(value, bool):
            return cls(_in_cents(Decimal(value)))
        raise TypeError(f"Expected `number | str`, got `{type(value).__name__}`")


def _in_cents(amount: Decimal) -> Decimal:
    """``amount`` at the column's scale (two places) when that is exact, else as it is
    (for `budget_problems` to refuse). ``0E-99999`` is 0.00: asyncpg, which PUT and
    PATCH write through, cannot send that exponent, and PostgreSQL, which reads POST's
    JSON, can."""
    try:
        cents = amount.quantize(_CENT)
    except InvalidOperation:  # too many digits, or infinite
        return amount
    return cents if cents == amount else amount


_BUDGET_DOC = "Amount with at most two decimal places, 0 to 1,000,000,000."
#: A budget in a request: the range and the places are checked by `budget_problems`.
Budget = Annotated[
    Amount,
    Meta(extra_json_schema={
        "description": _BUDGET_DOC + " A JSON number, or the same as a string (`\"12.30\"`).",
        "anyOf": [BUDGET_NUMBER, {"type": "string", "pattern": BUDGET_TEXT, "examples": ["12.30"]}],
    }),
]  # fmt: skip
#: A budget in a response: always a number.
StoredBudget = Annotated[Decimal, Meta(description=_BUDGET_DOC, extra_json_schema=BUDGET_NUMBER)]
DisplayName = Annotated[str, Meta(min_length=1, max_length=100, pattern=NO_NUL)]
Limit = Annotated[int, Meta(ge=1, le=100, description="Page size (default 20).")]
Cursor = Annotated[
    str,
    Meta(
        pattern=CURSOR_PATTERN,
        description="`next_cursor` of the previous page (opaque: pass it back as it came).",
    ),
]


class Milestone(msgspec.Struct, forbid_unknown_fields=True):
    title: Name
    due: dt.date
    done: bool = False


Milestones = Annotated[list[Milestone], Meta(max_length=50)]


def budget_problems(budget: Decimal | None) -> list[ErrorDetail]:
    if budget is None:
        return []
    try:
        ok = budget.is_finite() and 0 <= budget <= BUDGET_MAX
        if ok and budget != budget.quantize(_CENT):
            return [ErrorDetail("$.budget", "at most two decimal places")]
    except InvalidOperation:
        ok = False
    if not ok:
        return [ErrorDetail("$.budget", "must be between 0 and 1000000000")]
    return []


def dates_problems(starts_on: dt.date | None, ends_on: dt.date | None) -> list[ErrorDetail]:
    if starts_on is not None and ends_on is not None and ends_on < starts_on:
        return [ErrorDetail("$.ends_on", "must not be before starts_on")]
    return []


class ProjectIn(Checked, forbid_unknown_fields=True, kw_only=True):
    """A project as clients create or replace it."""

    rules: ClassVar[tuple[str, ...]] = (
        "`ends_on` is not before `starts_on` (422 `validation_error` at `$.ends_on`).",
    )

    name: Name
    description: Description = ""
    owner_email: Email
    budget: Budget
    status: Status = "draft"
    tags: Tags = []
    starts_on: dt.date
    ends_on: dt.date | None = None
    milestones: Milestones = []

    @classmethod
    def problems(cls, get: Callable[[str], Any]) -> list[ErrorDetail]:
        return budget_problems(get("budget")) + dates_problems(get("starts_on"), get("ends_on"))


class ProjectPatch(Checked, forbid_unknown_fields=True, kw_only=True):
    """A JSON merge patch (RFC 7396) of a project: absent fields stay as they are.

    Only ``ends_on`` may be null. The merged project is validated as a whole.
    """

    rules: ClassVar[tuple[str, ...]] = (
        "The project after the merge keeps `ends_on` not before `starts_on` (422 "
        "`validation_error` at `$.ends_on`), whichever of them the patch sets.",
    )

    name: Name | UnsetType = UNSET
    description: Description | UnsetType = UNSET
    owner_email: Email | UnsetType = UNSET
    budget: Budget | UnsetType = UNSET
    status: Status | UnsetType = UNSET
    tags: Tags | UnsetType = UNSET
    starts_on: dt.date | UnsetType = UNSET
    ends_on: dt.date | UnsetType | None = UNSET
    milestones: Milestones | UnsetType = UNSET

    @classmethod
    def problems(cls, get: Callable[[str], Any]) -> list[ErrorDetail]:
        budget = get("budget")
        return budget_problems(None if budget is UNSET else budget)


class Project(msgspec.Struct, kw_only=True):
    """A stored project. ``version`` is also its ETag."""

    id: int
    name: Name
    description: Description
    owner_email: Email
    budget: StoredBudget
    status: Status
    tags: Tags
    starts_on: dt.date
    ends_on: dt.date | None
    milestones: Milestones
    created_at: dt.datetime
    updated_at: dt.datetime
    version: int


class Page(msgspec.Struct, kw_only=True):
    next_cursor: str | None


class ProjectPage(Page, kw_only=True):
    """One page of projects by ascending id; ``next_cursor`` is null on the last.

    A filtered page examines at most 5,000 projects: it may hold fewer than
    ``limit``, or none, and still have a ``next_cursor``.
    """

    items: list[Project]


class ProjectQuery(msgspec.Struct, forbid_unknown_fields=True):
    # UNSET, not None, for absent parameters: query text is parsed leniently,
    # and ``?status=null`` must be a bad status, not "no filter".
    limit: Limit = 20
    cursor: Cursor | UnsetType = UNSET
    status: Status | UnsetType = UNSET
    tag: Tag | UnsetType = UNSET


class UserIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    email: Email
    display_name: DisplayName


class UserPatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    email: Email | UnsetType = UNSET
    display_name: DisplayName | UnsetType = UNSET


class User(msgspec.Struct, kw_only=True):
    id: int
    email: Email
    display_name: DisplayName
    created_at: dt.datetime
    updated_at: dt.datetime


class UserPage(Page, kw_only=True):
    items: list[User]


class UserQuery(msgspec.Struct, forbid_unknown_fields=True):
    limit: Limit = 20
    cursor: Cursor | UnsetType = UNSET
