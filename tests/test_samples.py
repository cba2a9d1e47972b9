"""Every sample runs unchanged on every binder: only the binder type (and the broker
address) differ, given the way a user would, through environment variables."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamkit.binder import Binder
from streamkit.conformance.plugin import ActiveProfile

SAMPLES = Path(__file__).resolve().parent.parent / "samples"

#: sample directory -> (a log line fragment its last function prints, how many)
EXPECTED = {
    "uppercase": ("uppercase: ", 3),
    "orders": ("orders: invoice ", 3),
}


def _env(profile: ActiveProfile) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMKIT_BINDERS")}
    env["STREAMKIT_BINDERS__BUS__TYPE"] = profile.profile.binder_type
    for key, value in profile.settings.items():
        env[f"STREAMKIT_BINDERS__BUS__{key.upper()}"] = str(value)
    env["STREAMKIT_POLL_INTERVAL"] = "0.1"
    return env


@pytest.mark.parametrize("sample", sorted(EXPECTED))
def test_sample_runs_unchanged_and_stops_cleanly(
    sample: str, profile: ActiveProfile, binder: Binder
) -> None:
    fragment, wanted = EXPECTED[sample]
    process = subprocess.Popen(
        [sys.executable, "-m", "streamkit.cli", "run", "app:app"],
        cwd=SAMPLES / sample,
        env=_env(profile),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    seen: list[str] = []
    lines: list[str] = []
    deadline = time.monotonic() + 60
    try:
        for line in process.stdout:
            lines.append(line)
            if fragment in line:
                seen.append(line)
            if len(seen) >= wanted or time.monotonic() > deadline:
                break
    finally:
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)

    output = "".join(lines) + rest
    assert len(seen) >= wanted, output[-3000:]
    assert process.returncode == 0, output[-3000:]
    assert f"app {sample} stopped" in output
