"""Settlement bookkeeping for one assigned partition.

Kafka keeps one number per (group, partition): the committed offset, "everything
before this is done". A consumer with concurrency finishes messages out of order,
and a released message must come back, so the committable offset is the offset of
the first message that is not settled yet: acking m2 and m4 while m1 and m3 are
pending commits nothing past m1 (CASES.md C1, C2).

Offsets need not be contiguous (compaction, transaction markers), so the tracker
orders what it actually handed out instead of counting from the committed offset.
A release seeks the partition back; the records fetched again are filtered here, so
that a record still in flight or already acked is not handed out twice.

Failed attempts (``record_attempt``) are counted per offset and travel in the
metadata string of the offset commit, so that the next owner of the partition, in
this process or another, starts at the right attempt.
"""

from __future__ import annotations

import enum
import logging
from collections import deque

__all__ = ["PartitionTracker", "State", "decode_failures", "encode_failures"]

logger = logging.getLogger(__name__)

#: Prefix of the commit metadata this module writes (a format version).
_METADATA_PREFIX = "sk1:"
#: Kafka's default offset.metadata.max.bytes is 4096; stay well below it.
_METADATA_MAX = 2048


def encode_failures(failures: dict[int, int]) -> str:
    """The commit metadata for failed-attempt counts: ``sk1:offset=count,...``."""
    if not failures:
        return ""
    text = _METADATA_PREFIX
    for offset, count in sorted(failures.items()):
        item = f"{offset}={count},"
        if len(text) + len(item) > _METADATA_MAX:
            # The lowest offsets are retried first; the ones left out restart
            # their count only if this process dies before they are settled.
            break
        text += item
    return text.rstrip(",")


def decode_failures(metadata: str | None) -> dict[int, int]:
    """Counts written by :func:`encode_failures`; anything else reads as none."""
    if not metadata or not metadata.startswith(_METADATA_PREFIX):
        return {}
    failures: dict[int, int] = {}
    for item in metadata.removeprefix(_METADATA_PREFIX).split(","):
        offset, _, count = item.partition("=")
        if offset.isdigit() and count.isdigit():
            failures[int(offset)] = int(count)
    return failures


class State(enum.Enum):
    IN_FLIGHT = "in-flight"
    DONE = "done"
    RELEASED = "released"


class PartitionTracker:
    """One partition of one assignment generation.

    A tracker is replaced when its partition is revoked and assigned again, so a
    settle of a delivery from an old generation finds ``revoked`` set and is ignored.
    """

    def __init__(self, partition: int, failures: dict[int, int] | None = None) -> None:
        self.partition = partition
        self.revoked = False
        self.in_flight = 0
        self.committed: int | None = None
        self.failures: dict[int, int] = dict(failures or {})
        self.metadata_dirty = False
        self._order: deque[int] = deque()
        self._state: dict[int, State] = {}
        self._end: int | None = None
        self._cursor: int | None = None

    # -- fetched records ---------------------------------------------------------

    def accept(self, offset: int) -> int | None:
        """Register a fetched record; its attempt number, or ``None`` to skip it."""
        self._cursor = offset + 1
        state = self._state.get(offset)
        if state is None:
            if self._end is not None and offset < self._end:
                return None  # acked and committed past already
            self._order.append(offset)
            self._end = offset + 1
        elif state is not State.RELEASED:
            return None  # still being handled, or acked: not a second time
        self._state[offset] = State.IN_FLIGHT
        self.in_flight += 1
        return self.failures.get(offset, 0) + 1

    @property
    def window(self) -> int:
        """How many records are tracked above the committable offset."""
        return len(self._order)

    # -- settle ------------------------------------------------------------------

    def ack(self, offset: int) -> bool:
        """Mark ``offset`` done; ``True`` if the committable offset may have moved."""
        if self._state.get(offset) is not State.IN_FLIGHT:
            return False
        self._state[offset] = State.DONE
        self.in_flight -= 1
        return self._compact()

    def release(self, offset: int) -> int | None:
        """Give ``offset`` back; the offset to seek to, or ``None`` if no seek is due.

        A seek is due when the fetch cursor is already past the released record;
        when an earlier release moved it back below, the record is fetched again on
        the way.
        """
        if self._state.get(offset) is not State.IN_FLIGHT:
            return None
        self._state[offset] = State.RELEASED
        self.in_flight -= 1
        if self._cursor is not None and offset >= self._cursor:
            return None
        self._cursor = offset
        return offset

    def record_failure(self, offset: int) -> bool:
        """Count one failed attempt on an in-flight ``offset``."""
        if self._state.get(offset) is not State.IN_FLIGHT:
            return False
        self.failures[offset] = self.failures.get(offset, 0) + 1
        self.metadata_dirty = True
        return True

    def metadata(self) -> str:
        """The commit metadata carrying the failure counts still relevant."""
        floor = self.commit_offset() or 0
        return encode_failures({o: n for o, n in self.failures.items() if o >= floor})

    def commit_offset(self) -> int | None:
        """The offset to commit: everything below it is settled."""
        if self._order:
            return self._order[0]
        return self._end

    def pending_commit(self) -> int | None:
        """The offset to commit now, or ``None`` when the last commit still holds.

        A commit is due when the offset moved or the failure counts changed.
        """
        offset = self.commit_offset()
        if offset is None:
            return None
        if self.committed is not None and offset <= self.committed:
            return offset if self.metadata_dirty else None
        return offset

    def _compact(self) -> bool:
        moved = False
        while self._order and self._state[self._order[0]] is State.DONE:
            offset = self._order.popleft()
            del self._state[offset]
            if self.failures.pop(offset, None) is not None:
                self.metadata_dirty = True
            moved = True
        return moved
