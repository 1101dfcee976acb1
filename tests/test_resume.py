"""The replay buffer and the resume_from parameter, alone (the end-to-end resume proof is in
tests/test_durable_sessions.py)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resume import MAX_SEQ, ReplayBuffer, ResumeRefused, parse_resume_from


@pytest.mark.parametrize("raw, value", [(None, None), ("0", 0), ("17", 17), (str(MAX_SEQ), MAX_SEQ)])
def test_resume_from_accepted(raw, value):
    assert parse_resume_from(raw) == value


@pytest.mark.parametrize("raw", ["", "-1", "1.5", "1e3", " 1", "0x10", "١٢", str(MAX_SEQ + 1), "9" * 400])
def test_resume_from_refused(raw):
    with pytest.raises(ResumeRefused):
        parse_resume_from(raw)


def test_replay_sends_what_was_missed_in_order():
    buf = ReplayBuffer(max_bytes=1000)
    for seq in range(1, 6):
        buf.add(seq, f"n{seq}", 10)
    assert buf.since(2).texts == ["n3", "n4", "n5"] and buf.since(2).missing_from is None
    assert buf.since(5).texts == [] and buf.since(0).texts == ["n1", "n2", "n3", "n4", "n5"]


def test_bounded_in_bytes_and_says_what_is_lost():
    buf = ReplayBuffer(max_bytes=25)
    for seq in range(1, 6):
        buf.add(seq, f"n{seq}", 10)
    assert buf.bytes <= 25 and [s for s, _, _ in buf.entries] == [4, 5] and buf.floor == 3
    replay = buf.since(1)
    assert replay.texts == ["n4", "n5"] and replay.missing_from == 2
    assert buf.since(3).missing_from is None
    buf.add(6, "huge", 1000)  # the newest is kept even when it alone is over the bound
    assert [s for s, _, _ in buf.entries] == [6] and buf.floor == 5


def test_clear_keeps_the_floor():
    buf = ReplayBuffer(max_bytes=100)
    buf.add(1, "a", 1)
    buf.clear(7)
    assert buf.since(7).texts == [] and buf.since(7).missing_from is None
    assert buf.since(3).missing_from == 4


@given(st.lists(st.integers(1, 50), min_size=1, max_size=60), st.integers(1, 400), st.data())
def test_replay_never_gaps_silently(sizes, max_bytes, data):
    buf = ReplayBuffer(max_bytes)
    for seq, size in enumerate(sizes, 1):
        buf.add(seq, str(seq), size)
    resume_from = data.draw(st.integers(0, len(sizes)))
    replay = buf.since(resume_from)
    got = [int(t) for t in replay.texts]
    assert got == sorted(got) and all(s > resume_from for s in got)
    if replay.missing_from is None:  # nothing lost: exactly everything after resume_from
        assert got == list(range(resume_from + 1, len(sizes) + 1))
    else:  # the loss is announced, and everything kept after it is there
        assert replay.missing_from == resume_from + 1 <= buf.floor
        assert got == list(range(buf.floor + 1, len(sizes) + 1))
    assert buf.bytes <= max_bytes or len(buf.entries) == 1
