"""The dead-letter record: the original bytes and headers, plus why it failed.

Header names follow Spring Cloud Stream's republishing recoverer (``x-exception-*``,
``x-original-*``), so Spring tooling reads streamkit's dead letters and back:

=========================  ============================================================
``x-exception-fqcn``       the exception's class, ``module.QualName``
``x-exception-message``    its message, at most 1 KiB
``x-exception-stacktrace`` the traceback, at most 8 KiB (the tail is kept), so the
                           record fits an AMQP frame and a Kafka request
``x-original-destination`` where the record was first consumed from
``x-original-group``       the consumer group ('' for an anonymous consumer)
``x-original-partition``   its partition, when known
``x-original-id``          the broker's id of the original record (offset, stream id)
``x-attempts``             how many times the handler was called (0: never, e.g. a
                           payload that could not be decoded)
``x-dlq-reason``           ``decode``, ``retries-exhausted``, ``non-retryable`` or
                           ``encode``
=========================  ============================================================

A dead letter that is dead-lettered again keeps the first ``x-original-*`` headers and
gets one fresh set of ``x-exception-*`` headers, so headers never pile up.
"""

from __future__ import annotations

import traceback

from ..binder import Delivery, Record

__all__ = ["MAX_MESSAGE", "MAX_STACKTRACE", "dead_letter_record"]

MAX_MESSAGE = 1024
MAX_STACKTRACE = 8192


def _truncate(text: str, limit: int, *, keep_tail: bool = False) -> bytes:
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return data
    marker = b"...[truncated]..."
    room = limit - len(marker)
    if keep_tail:
        return marker + data[-room:].decode("utf-8", "ignore").encode()
    return data[:room].decode("utf-8", "ignore").encode() + marker


def _qualified_name(exc: BaseException) -> str:
    cls = type(exc)
    return f"{cls.__module__}.{cls.__qualname__}"


def dead_letter_record(
    delivery: Delivery,
    exc: BaseException,
    *,
    group: str | None,
    attempts: int,
    reason: str,
) -> Record:
    """Build the dead letter of ``delivery`` that failed with ``exc``."""
    headers = dict(delivery.headers)
    trace = "".join(traceback.format_exception(exc))
    headers["x-exception-fqcn"] = _qualified_name(exc).encode()
    headers["x-exception-message"] = _truncate(str(exc), MAX_MESSAGE)
    headers["x-exception-stacktrace"] = _truncate(trace, MAX_STACKTRACE, keep_tail=True)
    if "x-original-destination" not in headers:
        headers["x-original-destination"] = delivery.destination.encode()
        headers["x-original-group"] = (group or "").encode()
        headers["x-original-id"] = delivery.id.encode()
        if delivery.partition is not None:
            headers["x-original-partition"] = str(delivery.partition).encode()
    headers["x-attempts"] = str(attempts).encode()
    headers["x-dlq-reason"] = reason.encode()
    return Record(
        value=delivery.value,
        headers=headers,
        key=delivery.key,
        partition=delivery.partition,
    )
