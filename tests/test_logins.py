"""Login throttling against a real gateway: guesses are stopped, the owner is never locked out.

Clients on other loopback addresses (127.0.0.2, 127.0.0.3) play attackers on
other machines: the gateway sees their real source address.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any
from urllib.parse import urlencode

from core.infra.rate import Rate
from core.passwords import PER_ADDRESS
from tests.harness import ApiClient, running_gateway, token_for, ws_client
from tests.test_accounts import ADA, login, register

EVE = {"email": "eve@example.com", "display_name": "Eve", "password": "eve's own passphrase"}
OWNER_IP, ATTACKER_IP, OTHER_IP = "127.0.0.1", "127.0.0.2", "127.0.0.3"


def per_minute(n: int) -> Rate:
    return Rate(n, 60.0)


async def test_an_attacker_elsewhere_cannot_lock_the_owner_out(clean_db):
    async with running_gateway(
        **clean_db, rate_login_account=per_minute(3), rate_login_ip=per_minute(50)
    ) as gw:
        owner = ApiClient(gw.port, None, source_ip=OWNER_IP)
        attacker = ApiClient(gw.port, None, source_ip=ATTACKER_IP)
        try:
            await register(owner)
            statuses = [(await login(attacker, ADA["email"], f"guess {i}"))[0] for i in range(8)]
            assert statuses == [400] * 3 + [429] * 5
            # Even the right password is refused from the attacker's address now...
            assert (await login(attacker))[0] == 429
            # ...while the owner, from hers, gets in as often as she likes.
            for _ in range(5):
                status, tokens = await login(owner)
                assert status == 200, tokens
        finally:
            owner.close()
            attacker.close()


async def test_concurrent_guesses_cannot_slip_past_the_count(clean_db):
    async with running_gateway(
        **clean_db, rate_login_account=per_minute(3), rate_login_ip=per_minute(50)
    ) as gw:
        attacker = ApiClient(gw.port, None, source_ip=ATTACKER_IP)
        try:
            await register(attacker)
            results = await asyncio.gather(
                *(login(attacker, ADA["email"], f"guess {i}") for i in range(12))
            )
            statuses = sorted(status for status, _ in results)
            assert statuses == [400] * 3 + [429] * 9
        finally:
            attacker.close()


async def test_successes_never_count_and_cannot_wipe_failures_against_others(clean_db):
    async with running_gateway(
        **clean_db, rate_login_account=per_minute(100), rate_login_ip=per_minute(3)
    ) as gw:
        eve = ApiClient(gw.port, None, source_ip=ATTACKER_IP)
        try:
            await register(eve, ADA)
            await register(eve, EVE)
            for _ in range(6):  # twice the per-IP allowance, all successful
                assert (await login(eve, EVE["email"], EVE["password"]))[0] == 200
            # Eve's own logins between guesses give back their own attempt, no more.
            for i in range(2):
                assert (await login(eve, ADA["email"], f"guess {i}"))[0] == 400
                assert (await login(eve, EVE["email"], EVE["password"]))[0] == 200
            assert (await login(eve, ADA["email"], "guess 2"))[0] == 400
            status, body = await login(eve, ADA["email"], "guess 3")
            assert status == 429 and body["error"]["code"] == "rate_limited"
            # Other addresses keep their own allowance.
            other = ApiClient(gw.port, None, source_ip=OTHER_IP)
            try:
                assert (await login(other, ADA["email"], "guess 4"))[0] == 400
            finally:
                other.close()
        finally:
            eve.close()


async def test_another_spelling_of_an_address_gets_no_allowance_of_its_own(clean_db):
    # PostgreSQL's lower() maps "\u0130" (I with a dot above) to "i", Python's to "i" and a
    # combining dot: "\u0130da@example.com" was counted apart from ida@example.com, yet
    # checked against Ida's password. Each "i" of an address spelled either way gave an
    # attacker RATE_LOGIN_ACCOUNT more guesses at it from one address.
    ida = {"email": "ida@example.com", "display_name": "Ida", "password": "ida's own passphrase"}
    async with running_gateway(
        **clean_db, rate_login_account=per_minute(2), rate_login_ip=per_minute(50)
    ) as gw:
        attacker = ApiClient(gw.port, None, source_ip=ATTACKER_IP)
        try:
            await register(attacker, ida)
            guesses = [(await login(attacker, ida["email"], f"guess {i}"))[0] for i in range(3)]
            assert guesses == [400, 400, 429]
            for spelling in ("\u0130da@example.com", "IDA@EXAMPLE.COM"):
                status, body = await login(attacker, spelling, ida["password"])
                assert status != 200, (spelling, body)
        finally:
            attacker.close()


class _Slow:
    """A password hasher whose verifications take 0.1 s, counting how many run at once."""

    def __init__(self, hasher: Any) -> None:
        self._hasher = hasher
        self._lock = threading.Lock()
        self._now = 0
        self.most = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hasher, name)

    def verify(self, stored: Any, password: Any) -> Any:
        with self._lock:
            self._now += 1
            self.most = max(self.most, self._now)
        try:
            time.sleep(0.1)  # a hash's cost, whatever the machine
            return self._hasher.verify(stored, password)
        finally:
            with self._lock:
                self._now -= 1


async def test_one_address_cannot_keep_every_password_hash_busy(clean_db, monkeypatch):
    # Successful logins count against no limit (above), so one client that knows its own
    # password kept every worker thread hashing for it (6 on 2 CPUs, each hash ~0.24 s at
    # the production cost), and other users' logins waited behind its whole queue:
    # 20 of them in flight took a bystander's login from 0.24 s to 2.7-4.3 s.
    async with running_gateway(
        **clean_db, rate_login_account=per_minute(100), rate_login_ip=per_minute(100)
    ) as gw:
        eve = ApiClient(gw.port, None, source_ip=ATTACKER_IP)
        owner = ApiClient(gw.port, None, source_ip=OWNER_IP)
        try:
            await register(owner)
            await register(eve, EVE)
            passwords = gw.ctx.core.accounts._passwords
            slow = _Slow(passwords._hasher)
            monkeypatch.setattr(passwords, "_hasher", slow)
            done: list[str] = []

            async def eve_logs_in() -> int:
                client = ApiClient(gw.port, None, source_ip=ATTACKER_IP)
                try:
                    status = (await login(client, EVE["email"], EVE["password"]))[0]
                finally:
                    client.close()
                done.append("eve")
                return status

            storm = [asyncio.ensure_future(eve_logs_in()) for _ in range(16)]
            await asyncio.sleep(0.05)  # all queued
            assert (await login(owner))[0] == 200
            done.append("owner")
            assert await asyncio.gather(*storm) == [200] * 16  # nobody is refused
            # Eve's hashes take turns: the owner waited for few of them, not for all.
            assert done.index("owner") <= 2 * PER_ADDRESS, done
            assert slow.most <= PER_ADDRESS + 1
        finally:
            eve.close()
            owner.close()


def _rpc_form(**fields: str) -> str:
    """A form-encoded body that survives the rpc frame's JSON: a JSON string."""
    return "_=&" + urlencode(fields) + "&_="


async def test_rpc_logins_are_limited_per_socket_address(clean_db):
    async with running_gateway(
        **clean_db, rate_login_account=per_minute(2), rate_login_ip=per_minute(50)
    ) as gw:
        owner = ApiClient(gw.port, None, source_ip=OWNER_IP)
        try:
            await register(owner)
        finally:
            owner.close()

        async def rpc_login(client, password: str) -> int:
            form = _rpc_form(grant_type="password", username=ADA["email"], password=password)
            reply = await client.request("rpc", method="POST", path="/api/auth/token", body=form)
            return int(reply["status"])

        token = token_for(gw, "anyone")
        async with ws_client(gw.port, token, local_addr=(ATTACKER_IP, 0)) as attacker:
            statuses = [await rpc_login(attacker, f"guess {i}") for i in range(5)]
            assert statuses == [400, 400, 429, 429, 429]
        async with ws_client(gw.port, token, local_addr=(OWNER_IP, 0)) as mine:
            assert await rpc_login(mine, ADA["password"]) == 200
        owner = ApiClient(gw.port, None, source_ip=OWNER_IP)
        try:
            assert (await login(owner))[0] == 200
        finally:
            owner.close()


async def test_rpc_to_the_token_route_takes_no_more_body_than_http(clean_db):
    # Over HTTP a login form over 8 KiB is refused unread. Over a socket it was parsed
    # whatever its size: a 64 KiB frame had parse_qs split 16,000 fields (~50 ms with
    # every other socket of the process waiting, per frame, for any token).
    async with running_gateway(**clean_db) as gw:
        async with ws_client(gw.port, token_for(gw, "anyone")) as c:
            padded = _rpc_form(**{f"f{i}": "1" for i in range(8_000)}, grant_type="password")
            reply = await c.request("rpc", method="POST", path="/api/auth/token", body=padded)
    assert reply["status"] == 413
    assert reply["body"]["error"] == {
        "status": 413, "code": "payload_too_large", "message": "body over 8192 bytes"
    }  # fmt: skip
