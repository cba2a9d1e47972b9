"""Conformance profiles of the Kafka binder.

``kafka``: the binder against ``$STREAMKIT_KAFKA_BOOTSTRAP`` (a real Kafka, e.g. the
one in compose.yaml) or, when that is unset, against a Tansu broker the suite starts
on a free port for the session (see :mod:`streamkit_kafka.testing`). Group timings are
shortened so that a crashed member's partitions move within seconds.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

from streamkit.conformance import BinderProfile

from .testing import BOOTSTRAP_ENV, kafka_bootstrap

__all__ = ["TEST_SETTINGS", "profiles"]

#: Binder settings of the test profile, merged under the bootstrap address.
TEST_SETTINGS: dict[str, Any] = {
    "client_id": "streamkit-conformance",
    # Kafka's smallest accepted session timeout (group.min.session.timeout.ms).
    "session_timeout_ms": 6_000,
    "heartbeat_interval_ms": 500,
    "commit_interval_ms": 200,
    "revocation_timeout_ms": 3_000,
    "request_timeout_ms": 15_000,
    "delivery_timeout_ms": 15_000,
    "fetch_max_wait_ms": 100,
}


#: On Tansu: a member waits about half its session timeout (rounded up to whole
#: seconds) for a JoinGroup answer, so a 2 s session turns a 3 s join into 1 s
#: (Apache Kafka refuses sessions under 6 s by default). And members leave by
#: session expiry: Tansu can wedge a group when members send LeaveGroup during a
#: rebalance (see README.md).
TANSU_SETTINGS: dict[str, Any] = {
    "session_timeout_ms": 2_000,
    "heartbeat_interval_ms": 400,
    "leave_group_on_close": False,
}


@contextlib.contextmanager
def _broker() -> Iterator[Mapping[str, Any]]:
    with kafka_bootstrap() as (bootstrap, tansu):
        yield {"bootstrap_servers": bootstrap, **(TANSU_SETTINGS if tansu else {})}


def profiles() -> list[BinderProfile]:
    return [
        BinderProfile(
            name="kafka",
            binder_type="kafka",
            settings=lambda: dict(TEST_SETTINGS),
            setup=_broker,
            env=(BOOTSTRAP_ENV,),
            capabilities={
                # A dead member is noticed after the session timeout, then the
                # group rebalances.
                "crash_recovery_seconds": 15.0,
                # Tansu drops offset commit metadata, where failure counts live.
                "native_delivery_count": bool(os.environ.get(BOOTSTRAP_ENV)),
            },
            receive_timeout=20.0,
        )
    ]
