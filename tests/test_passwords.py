"""Password rules (NIST SP 800-63B): common, blank and repetitive passwords are refused."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from core.passwords import common_passwords, password_problems
from tests.harness import ApiClient, running_gateway
from tests.test_accounts import login

EMAIL = "ada.lovelace@example.com"


def test_the_shipped_list_holds_the_10000_most_common_of_8_characters_or_more():
    words = common_passwords()
    assert len(words) == 10_000
    assert {"password", "12345678", "iloveyou", "trustno1", "baseball"} <= words
    assert all(len(w) >= 8 and w == w.casefold() for w in words)
    package_data = configparser.ConfigParser()
    package_data.read(Path(__file__).parent.parent / "setup.cfg")
    assert "common_passwords.txt.gz" in package_data["options.package_data"]["core"]


@pytest.mark.parametrize(
    "password",
    [
        "password",
        "Password1",  # case does not help
        " iloveyou ",  # nor spaces around
        "12345678",
        "        ",  # eight spaces
        "\t\u3000 \n  \u00a0 ",
        "aaaaaaaaaaaa",
        "abababababab",
        "abcdefghij",
        "98765432",
        "ada.lovelace1815",  # the e-mail's name
        "my mail is ada.lovelace@example.com",
    ],
)
def test_weak_passwords_are_refused_with_a_reason(password):
    (problem,) = password_problems(password, EMAIL)
    assert problem.path == "$.password" and problem.message.startswith(("password", "this is"))


@pytest.mark.parametrize(
    "password",
    [
        "correct horse battery staple",
        "P4ssw0rd!x",  # not in the list: no composition rules either way
        "пароль на русском",  # any Unicode
        "🦄🌈✨ unicorns",
        "x" * 7 + "yz" + " long passphrases are welcome " * 30,
    ],
)
def test_good_passwords_pass(password):
    assert password_problems(password, EMAIL) == []


async def test_registration_answers_422_for_a_common_password_and_accepts_a_passphrase(clean_db):
    async with running_gateway(**clean_db) as gw:
        anon = ApiClient(gw.port, None)
        try:
            for weak in ("password", "12345678", " " * 8):
                who = {"email": EMAIL, "display_name": "Ada", "password": weak}
                status, _, body = await anon.call("POST", "/api/auth/register", who)
                assert status == 422, body
                (detail,) = body["error"]["details"]
                assert detail["path"] == "$.password" and "password" in detail["message"]
            passphrase = "Die Würde des Menschen ist unantastbar"
            who = {"email": EMAIL, "display_name": "Ada", "password": passphrase}
            status, _, body = await anon.call("POST", "/api/auth/register", who)
            assert status == 201, body
            assert (await login(anon, EMAIL, passphrase))[0] == 200
        finally:
            anon.close()
