"""Login throttling that stops guessing without locking the owner out.

Two allowances are counted before a password is checked, and only failures
keep what they counted:

- ``RATE_LOGIN_ACCOUNT`` per (account, client IP): an attacker hammering
  an account from one address uses up that address's allowance for it and
  nobody else's, so the owner still logs in from hers. A success resets it
  (whoever succeeds knows the password).
- ``RATE_LOGIN_IP`` per client IP (an IPv6 address by its /64), over every account: bounds password
  spraying from one address. A success refunds its own attempt only, so
  logging in to one's own account cannot reset the count of failures
  against others.

A refresh with a refresh token nobody issued counts as a failure against
``RATE_LOGIN_IP`` too (`LoginGuard.begin_refresh`): it is a guess like a
wrong password, and each costs the database a transaction and a query.

Counting first and refunding on success (rather than checking, then
counting failures) means a thousand concurrent guesses cannot all pass one
check. Requests with no known IP (none should remain) share the key ``-``.
"""

from __future__ import annotations

from core.infra.clientip import limit_key
from core.infra.errors import TooManyRequests
from core.infra.rate import Rate
from core.infra.ratelimit import RateLimiter

__all__ = ["LoginGuard"]


class LoginGuard:
    def __init__(self, limiter: RateLimiter, per_ip: Rate | None, per_account: Rate | None) -> None:
        self._limiter = limiter
        self._per_ip = per_ip
        self._per_account = per_account

    async def begin(self, email: str, client: str) -> LoginAttempt:
        """Count an attempt for ``email`` from ``client``; `TooManyRequests` when over a limit."""
        ip = limit_key(client) if client else "-"
        # An IP never holds "|", so no (IP, e-mail) pair can stand for another.
        attempt = LoginAttempt(self, f"login-fail-ip:{ip}", f"login-fail:{ip}|{email.lower()}")
        counted: list[tuple[str, Rate]] = []
        for key, rate in attempt.keys():
            decision = await self._limiter.hit(key, *rate)
            if not decision.allowed:
                for done_key, done_rate in counted:  # a refused attempt costs nothing
                    await self._limiter.refund(done_key, *done_rate)
                raise TooManyRequests(decision.retry_after, "failed login attempts")
            counted.append((key, rate))
        return attempt

    async def begin_refresh(self, client: str) -> LoginAttempt:
        """Count a refresh from ``client`` against ``RATE_LOGIN_IP``; `TooManyRequests` when over.

        `LoginAttempt.succeeded` once the token is found (issued here: valid,
        used, expired or revoked alike); one nobody issued keeps its count.
        """
        ip = limit_key(client) if client else "-"
        attempt = LoginAttempt(self, f"login-fail-ip:{ip}", None)
        if self._per_ip is not None:
            decision = await self._limiter.hit(attempt.ip_key, *self._per_ip)
            if not decision.allowed:
                raise TooManyRequests(decision.retry_after, "failed login attempts")
        return attempt


class LoginAttempt:
    """One counted attempt: a failure keeps it counted, `succeeded` gives it back."""

    def __init__(self, guard: LoginGuard, ip_key: str, account_key: str | None) -> None:
        self._guard = guard
        self.ip_key = ip_key
        self.account_key = account_key

    def keys(self) -> list[tuple[str, Rate]]:
        guard = self._guard
        pairs = ((self.ip_key, guard._per_ip), (self.account_key, guard._per_account))
        return [(key, rate) for key, rate in pairs if rate is not None and key is not None]

    async def succeeded(self) -> None:
        guard = self._guard
        if guard._per_ip is not None:
            await guard._limiter.refund(self.ip_key, *guard._per_ip)
        if guard._per_account is not None and self.account_key is not None:
            await guard._limiter.reset(self.account_key)
