"""The streamkit command: exit codes, messages, and a real run of a sample."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamkit.cli import main

ROOT = Path(__file__).resolve().parent.parent
UPPERCASE = ROOT / "samples" / "uppercase"


@pytest.fixture
def in_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(UPPERCASE)
    monkeypatch.delitem(sys.modules, "app", raising=False)  # another sample's app
    for name in list(os.environ):
        if name.startswith("STREAMKIT_BINDERS") or name == "STREAMKIT_CONFIG":
            monkeypatch.delenv(name)


def test_bindings_prints_the_resolved_table(in_sample: None) -> None:
    result = CliRunner().invoke(main, ["bindings", "app:app"])

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["BINDING", "DESTINATION", "GROUP", "BINDER"]
    assert any(
        line.split()[:3] == ["uppercase-in-0", "words", "uppercase"] for line in lines
    )


def test_config_prints_effective_settings_with_secrets_redacted(
    in_sample: None,
) -> None:
    result = CliRunner().invoke(
        main,
        [
            "config",
            "--set",
            "binders.bus.type=redis",
            "--set",
            "binders.bus.url=redis://:topsecret@cache:6379/0",
        ],
    )

    assert result.exit_code == 0, result.output
    assert "topsecret" not in result.output
    assert "redis://:***@cache:6379/0" in result.output
    assert "uppercase-in-0" in result.output


def test_bad_setting_exits_2_naming_the_key(in_sample: None) -> None:
    result = CliRunner().invoke(
        main,
        [
            "bindings",
            "app:app",
            "--set",
            "bindings.uppercase-in-0.consumer.concurrency=-1",
        ],
    )

    assert result.exit_code == 2
    assert "bindings.uppercase-in-0.consumer.concurrency" in result.output


def test_missing_module_is_a_usage_error(in_sample: None) -> None:
    result = CliRunner().invoke(main, ["run", "no_such_module:app"])

    assert result.exit_code == 2
    assert "cannot import module 'no_such_module'" in result.output


def test_binder_setting_typo_exits_2_naming_the_key(in_sample: None) -> None:
    result = CliRunner().invoke(main, ["config", "--set", "binders.bus.buffer_sise=5"])

    assert result.exit_code == 2
    assert "binders.bus.buffer_sise: unknown setting" in result.output


def test_unknown_binder_type_exits_2_with_install_hint(in_sample: None) -> None:
    result = CliRunner().invoke(
        main, ["bindings", "app:app", "--set", "binders.bus.type=nats"]
    )

    assert result.exit_code == 2
    assert "binders.bus.type" in result.output or "nats" in result.output
    assert "pip install" in result.output


def test_run_processes_messages_and_stops_cleanly_on_sigint() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMKIT_BINDERS")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamkit.cli",
            "run",
            "app:app",
            "--set",
            "poll_interval=0.05",
        ],
        cwd=UPPERCASE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    shouted = []
    deadline = time.monotonic() + 20
    for line in process.stdout:
        if "uppercase:" in line:
            shouted.append(line.rsplit(" ", 1)[-1].strip())
        if len(shouted) == 4 or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=20)

    assert shouted == ["HELLO!", "STREAM!", "KIT!", "WORLD!"]
    assert process.returncode == 0
    assert "app uppercase stopped" in rest


def test_asyncapi_describes_channels_and_payload_schemas(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(UPPERCASE.parent / "orders")
    monkeypatch.delitem(sys.modules, "app", raising=False)

    result = CliRunner().invoke(main, ["asyncapi", "app:app"])

    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["asyncapi"] == "3.0.0"
    invoice_in = document["channels"]["orders"]["messages"]["invoice-in-0-message"]
    assert invoice_in["payload"]["title"] == "Order"
    assert document["operations"]["invoice-in-0"]["action"] == "receive"
    assert document["operations"]["invoice-in-0"]["x-group"] == "billing"
