"""The pure helpers that read the lab workload's logs."""

from __future__ import annotations

import pytest

from freezeframe.lab.workload import check_invariant, last_sequence

PAD = b"x" * 2000


def rec(n: int, disk: int = 0) -> bytes:
    return b"seq=%d disk=%d pad=" % (n, disk) + PAD + b"\n"


def test_last_sequence_of_complete_lines() -> None:
    assert last_sequence(rec(1) + rec(2) + rec(3)) == 3


def test_last_sequence_ignores_torn_tail() -> None:
    assert last_sequence(rec(7) + rec(8) + b"seq=9 disk=0 pad=xx") == 8


def test_last_sequence_skips_garbage_lines() -> None:
    # A crash can leave a block of zero bytes (and a newline from a later record) at the end.
    assert last_sequence(rec(4) + b"\0" * 4096 + b"\n") == 4
    assert last_sequence(rec(4) + b"\0" * 100 + rec(5)[3:]) == 4


@pytest.mark.parametrize("data", [b"", b"seq=1 disk=0", b"\n\n", b"nothing here\n", b"seq=x \n"])
def test_last_sequence_none(data: bytes) -> None:
    assert last_sequence(data) is None


def test_last_sequence_needs_the_space_after_the_number() -> None:
    assert last_sequence(b"seq=12\n") is None
    assert last_sequence(b"seq=12 \n") == 12


def test_last_sequence_single_line_and_big_numbers() -> None:
    assert last_sequence(rec(123456789)) == 123456789


@pytest.mark.parametrize(
    ("seqs", "ok"),
    [
        ([], True),
        ([5], True),
        ([5, 5, 5], True),
        ([5, 4, 4], True),
        ([5, 5, 4], True),
        ([5, 4], True),
        ([4, 5], False),  # a later disk is newer: impossible in program order
        ([5, 3], False),  # a later disk is two rounds behind
        ([5, 4, 5], False),  # not monotonic
        ([6, 5, 4], False),  # spread of two
        ([0, 0], True),
    ],
)
def test_check_invariant(seqs: list[int], ok: bool) -> None:
    assert check_invariant(seqs) is ok
