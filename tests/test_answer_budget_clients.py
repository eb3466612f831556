"""ANSWER_BUFFER_TOTAL_BYTES between clients (core/infra/answerbudget.py).

Found by the review of the fifteenth session's fixes (2026-12-03): past the
budget, the stalled answers were reset largest first, whoever held them. A
client that split what it held over many answers a little smaller than
another user's (100 answers of 700 KB, 70 MB, against one of 1 MB from a
reader a moment behind) had the other user's answer reset first. Now the
client holding the most in all loses its largest answer first, until the
rest fit.
"""

from __future__ import annotations

import socket

from prometheus_client import CollectorRegistry, Counter

from core.infra.answerbudget import AnswerBudget
from core.infra.httpstream import HTTPStream

MB = 1_000_000


class _Answer:
    def __init__(self, client: str, size: int) -> None:
        self._client, self.size, self.was_reset = client, size, False

    def client(self) -> str:
        return self._client

    def unsent(self) -> int:
        return 0 if self.was_reset else self.size

    def reset(self) -> None:
        self.was_reset = True


def _budget(answers: list[_Answer], budget: int) -> AnswerBudget:
    shed = Counter("resets", "", registry=CollectorRegistry())
    return AnswerBudget(budget, lambda: answers, lambda conn: None, shed)


def test_many_answers_of_one_client_are_reset_before_another_user_s_larger_one():
    attacker = [_Answer("203.0.113.9", 700_000) for _ in range(100)]
    reader = _Answer("198.51.100.7", 1 * MB)
    answers = [*attacker, reader]
    assert _budget(answers, 64 * MB).check() == 10
    assert not reader.was_reset, "another user's answer was reset for the client holding 70 MB"
    assert sum(a.unsent() for a in answers) <= 64 * MB


def test_among_the_answers_of_one_client_the_largest_go_first():
    mine = [_Answer("10.0.0.1", size) for size in (5 * MB, 1 * MB, 3 * MB)]
    other = _Answer("10.0.0.2", 2 * MB)
    assert _budget([*mine, other], 7 * MB).check() == 1
    assert [a.was_reset for a in mine] == [True, False, False] and not other.was_reset


def test_a_client_holding_more_in_all_loses_an_answer_before_one_with_a_larger_answer():
    many = [_Answer("a", 4 * MB) for _ in range(3)]
    one = _Answer("b", 5 * MB)
    assert _budget([*many, one], 13 * MB).check() == 1
    assert sum(a.was_reset for a in many) == 1 and not one.was_reset


def test_a_stream_serves_its_client_by_its_address_an_ipv6_one_by_its_64():
    with socket.socket() as sock:
        stream = HTTPStream(sock)
        assert stream.client() == ""
        stream.serves(("2001:db8::1", 443, 0, 0))
        assert stream.client() == "2001:db8::/64"
        stream.serves("198.51.100.7")  # a PROXY header's source
        assert stream.client() == "198.51.100.7"
