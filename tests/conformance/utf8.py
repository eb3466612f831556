"""The classic UTF-8 decoder test sequences (Markus Kuhn's UTF-8-test.txt), as Autobahn groups them.

Group n of `kuhn_sequences` (from 0) is Autobahn's case group 6.(n + 5);
each entry is ``(valid, bytes)``.
"""

from __future__ import annotations

__all__ = ["kuhn_sequences"]


def kuhn_sequences() -> list[tuple[str, list[tuple[bool, bytes]]]]:
    """The classic sequences of Markus Kuhn's UTF-8 decoder test, grouped as Autobahn 6.5-6.23."""
    kosme = "κόσμε".encode()

    def valid(b: bytes) -> bool:
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    missing = [
        b"\xc0",
        b"\xe0\x80",
        b"\xf0\x80\x80",
        b"\xf8\x80\x80\x80",
        b"\xfc\x80\x80\x80\x80",
        b"\xdf",
        b"\xef\xbf",
        b"\xf7\xbf\xbf",
        b"\xfb\xbf\xbf\xbf",
        b"\xfd\xbf\xbf\xbf\xbf",
    ]
    lonely = [
        b"".join(bytes((i, 0x20)) for i in range(lo, hi))
        for lo, hi in ((0xC0, 0xDF), (0xE0, 0xEF), (0xF0, 0xF7), (0xF8, 0xFB), (0xFC, 0xFD))
    ]
    seqs: list[tuple[str, list[tuple[bool, bytes]]]] = [
        (
            "valid UTF-8",
            [
                (True, b"hello\x24world"),
                (True, b"hello\xc2\xa2world"),
                (True, b"hello\xe2\x82\xacworld"),
                (True, b"hello\xf0\xa4\xad\xa2world"),
                (True, kosme),
            ],
        ),
        (
            "prefixes of valid UTF-8",
            [(valid(kosme[:i]), kosme[:i]) for i in range(1, len(kosme) + 1)],
        ),
        (
            "first sequence of each length",
            [
                (True, b"\x00"),
                (True, b"\xc2\x80"),
                (True, b"\xe0\xa0\x80"),
                (True, b"\xf0\x90\x80\x80"),
            ],
        ),
        (
            "first 5/6-byte sequences",
            [(False, b"\xf8\x88\x80\x80\x80"), (False, b"\xfc\x84\x80\x80\x80\x80")],
        ),
        (
            "last sequence of each length",
            [
                (True, b"\x7f"),
                (True, b"\xdf\xbf"),
                (True, b"\xef\xbf\xbf"),
                (True, b"\xf4\x8f\xbf\xbf"),
            ],
        ),
        (
            "last 4/5/6-byte sequences",
            [
                (False, b"\xf7\xbf\xbf\xbf"),
                (False, b"\xfb\xbf\xbf\xbf\xbf"),
                (False, b"\xfd\xbf\xbf\xbf\xbf\xbf"),
            ],
        ),
        (
            "other boundaries",
            [
                (True, b"\xed\x9f\xbf"),
                (True, b"\xee\x80\x80"),
                (True, b"\xef\xbf\xbd"),
                (True, b"\xf4\x8f\xbf\xbf"),
                (False, b"\xf4\x90\x80\x80"),
            ],
        ),
        (
            "unexpected continuation bytes",
            [
                (False, b"\x80"),
                (False, b"\xbf"),
                (False, b"\x80\xbf"),
                (False, b"\x80\xbf\x80"),
                (False, b"\x80\xbf\x80\xbf"),
                (False, b"\x80\xbf\x80\xbf\x80"),
                (False, b"\x80\xbf\x80\xbf\x80\xbf"),
                (False, bytes(range(0x80, 0xBF))),
            ],
        ),
        ("lonely start bytes", [(False, s) for s in lonely]),
        ("last continuation byte missing", [(False, s) for s in missing]),
        ("concatenated incomplete sequences", [(False, b"".join(missing))]),
        ("impossible bytes", [(False, b"\xfe"), (False, b"\xff"), (False, b"\xfe\xfe\xff\xff")]),
        (
            "overlong ASCII",
            [
                (False, b"\xc0\xaf"),
                (False, b"\xe0\x80\xaf"),
                (False, b"\xf0\x80\x80\xaf"),
                (False, b"\xf8\x80\x80\x80\xaf"),
                (False, b"\xfc\x80\x80\x80\x80\xaf"),
            ],
        ),
        (
            "maximum overlong",
            [
                (False, b"\xc1\xbf"),
                (False, b"\xe0\x9f\xbf"),
                (False, b"\xf0\x8f\xbf\xbf"),
                (False, b"\xf8\x87\xbf\xbf\xbf"),
                (False, b"\xfc\x83\xbf\xbf\xbf\xbf"),
            ],
        ),
        (
            "overlong NUL",
            [
                (False, b"\xc0\x80"),
                (False, b"\xe0\x80\x80"),
                (False, b"\xf0\x80\x80\x80"),
                (False, b"\xf8\x80\x80\x80\x80"),
                (False, b"\xfc\x80\x80\x80\x80\x80"),
            ],
        ),
        (
            "single UTF-16 surrogates",
            [
                (False, bytes((0xED, b, c)))
                for b, c in (
                    (0xA0, 0x80),
                    (0xAD, 0xBF),
                    (0xAE, 0x80),
                    (0xAF, 0xBF),
                    (0xB0, 0x80),
                    (0xBE, 0x80),
                    (0xBF, 0xBF),
                )
            ],
        ),
        (
            "paired UTF-16 surrogates",
            [
                (False, bytes((0xED, a, b, 0xED, c, d)))
                for a, b in ((0xA0, 0x80), (0xAD, 0xBF), (0xAE, 0x80), (0xAF, 0xBF))
                for c, d in ((0xB0, 0x80), (0xBF, 0xBF))
            ],
        ),
        # Autobahn lists 34 non-characters; the first eight cover every lead byte.
        (
            "non-characters (valid)",
            [
                (True, b"\xef\xbf\xbe"),
                (True, b"\xef\xbf\xbf"),
                (True, b"\xf0\x9f\xbf\xbe"),
                (True, b"\xf0\x9f\xbf\xbf"),
                (True, b"\xf1\x8f\xbf\xbe"),
                (True, b"\xf2\x8f\xbf\xbf"),
                (True, b"\xf3\xbf\xbf\xbe"),
                (True, b"\xf4\x8f\xbf\xbf"),
            ],
        ),
        ("specials (valid)", [(True, bytes((0xEF, 0xBF, c))) for c in range(0xB9, 0xC0)]),
    ]
    return seqs
