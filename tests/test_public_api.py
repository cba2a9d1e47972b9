"""The flat public surface: what ``import streamkit`` promises."""

from __future__ import annotations

import json
import subprocess
import sys

import streamkit


def test_all_names_exist_and_nothing_public_is_missing() -> None:
    exported = set(streamkit.__all__)
    public = {n for n in vars(streamkit) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(streamkit, n)).__name__ == "module"}

    assert all(hasattr(streamkit, name) for name in exported)
    assert public - modules - {"annotations"} == exported


def test_core_imports_no_broker_client() -> None:
    probe = (
        "import json, sys, streamkit, streamkit.cli, streamkit.testing;"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )

    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout

    assert not {"aiokafka", "aio_pika", "aiormq", "redis"} & set(json.loads(out))
