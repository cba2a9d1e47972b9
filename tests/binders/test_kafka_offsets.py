"""The Kafka binder's offset bookkeeping, without a broker (CASES.md C1, C2).

A partition's committable offset is the first record not settled yet; these tests
drive :class:`PartitionTracker` the way the subscription does.
"""

from __future__ import annotations

import random

import pytest

pytest.importorskip("streamkit_kafka")

from streamkit_kafka.offsets import PartitionTracker, decode_failures, encode_failures


def fetched(tracker: PartitionTracker, *offsets: int) -> list[int]:
    """Offsets the tracker hands out from a fetch of ``offsets``."""
    return [o for o in offsets if tracker.accept(o) is not None]


def test_acks_of_later_records_do_not_commit_past_a_failed_one() -> None:
    tracker = PartitionTracker(0)
    fetched(tracker, 0, 1, 2, 3)

    tracker.ack(1)
    tracker.ack(3)

    assert tracker.commit_offset() == 0
    tracker.ack(0)
    assert tracker.commit_offset() == 2


def test_out_of_order_completion_commits_the_contiguous_prefix_only() -> None:
    tracker = PartitionTracker(0)
    offsets = list(range(100))
    fetched(tracker, *offsets)
    order = offsets[1:]
    random.Random(7).shuffle(order)

    for offset in order:
        tracker.ack(offset)
        assert tracker.commit_offset() == 0
    tracker.ack(0)

    assert tracker.commit_offset() == 100
    assert tracker.window == 0


def test_gaps_in_offsets_do_not_stall_commits() -> None:
    # Compacted topics and transaction markers leave holes in the offsets.
    tracker = PartitionTracker(0)
    fetched(tracker, 10, 12, 15)

    for offset in (15, 10, 12):
        tracker.ack(offset)

    assert tracker.commit_offset() == 16


def test_a_release_asks_for_a_seek_and_the_record_comes_back() -> None:
    tracker = PartitionTracker(0)
    fetched(tracker, 0, 1, 2, 3)
    tracker.ack(0)

    seek = tracker.release(1)

    assert seek == 1
    assert tracker.commit_offset() == 1
    # Fetched again from 1: 2 and 3 are still in flight, only 1 is handed out.
    assert fetched(tracker, 1, 2, 3, 4) == [1, 4]


def test_a_later_release_below_the_cursor_seeks_further_back() -> None:
    tracker = PartitionTracker(0)
    fetched(tracker, 0, 1, 2, 3, 4)

    assert tracker.release(3) == 3
    assert tracker.release(1) == 1
    assert tracker.release(4) is None  # the fetch from 1 passes 4 on its way

    assert fetched(tracker, 1, 2, 3, 4) == [1, 3, 4]


def test_repeated_releases_never_skip_a_record() -> None:
    tracker = PartitionTracker(0)
    pending = list(range(30))
    handed = fetched(tracker, *pending)
    done: set[int] = set()

    for _ in range(5):
        seek = None
        for offset in handed:
            if offset % 2 == 0:
                tracker.ack(offset)
                done.add(offset)
            else:
                target = tracker.release(offset)
                seek = target if seek is None else min(seek, target or seek)
        assert seek is not None
        handed = fetched(tracker, *range(seek, 30))
        assert set(handed) == {o for o in range(seek, 30) if o % 2}
    for offset in handed:
        tracker.ack(offset)

    assert tracker.commit_offset() == 30


def test_acked_records_are_not_handed_out_again_after_a_seek() -> None:
    tracker = PartitionTracker(0)
    fetched(tracker, 0, 1, 2)
    tracker.ack(2)

    tracker.release(0)

    assert fetched(tracker, 0, 1, 2) == [0]


def test_settling_twice_or_unknown_offsets_changes_nothing() -> None:
    tracker = PartitionTracker(0)
    fetched(tracker, 0, 1)

    assert tracker.ack(0) is True
    assert tracker.ack(0) is False
    assert tracker.release(0) is None
    assert tracker.ack(7) is False

    assert tracker.in_flight == 1
    assert tracker.commit_offset() == 1


def test_pending_commit_is_due_only_when_the_offset_or_the_counts_moved() -> None:
    tracker = PartitionTracker(0)
    fetched(tracker, 0, 1)
    tracker.ack(0)
    assert tracker.pending_commit() == 1
    tracker.committed = 1

    assert tracker.pending_commit() is None
    tracker.record_failure(1)
    assert tracker.pending_commit() == 1


def test_failure_counts_raise_the_attempt_and_are_forgotten_on_ack() -> None:
    tracker = PartitionTracker(0, failures={5: 2})

    assert tracker.accept(5) == 3
    assert tracker.accept(6) == 1
    tracker.record_failure(6)
    assert tracker.metadata() == "sk1:5=2,6=1"
    tracker.ack(5)
    tracker.ack(6)

    assert tracker.metadata() == ""


def test_a_give_back_keeps_the_attempt() -> None:
    tracker = PartitionTracker(0)
    assert tracker.accept(0) == 1

    tracker.release(0)

    assert tracker.accept(0) == 1


def test_failure_metadata_round_trips_and_ignores_foreign_strings() -> None:
    counts = {3: 1, 17: 4, 1_000_000: 2}

    assert decode_failures(encode_failures(counts)) == counts
    assert decode_failures("") == {}
    assert decode_failures("written by another client") == {}
    assert decode_failures("sk1:3=x,4=2,=") == {4: 2}


def test_failure_metadata_stays_under_kafkas_limit() -> None:
    counts = {offset: 9 for offset in range(10_000_000, 10_001_000)}

    text = encode_failures(counts)

    assert len(text) <= 2048
    kept = decode_failures(text)
    assert min(kept) == 10_000_000  # the lowest offsets, retried first, are kept
