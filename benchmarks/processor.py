"""Processor benchmark: streamkit against a tight loop on each raw client.

The job: read JSON orders (~200 B, with keys) from an input destination, decode each
into a pydantic model, enrich it, encode it, publish it to an output destination and
acknowledge the input. It runs three ways on each broker, in one invocation:

* ``raw``: the job written directly on the client (see :mod:`brokers`); on the
  memory binder, which has no client, a plain ``asyncio.Queue`` loop doing the same
  decode/encode work;
* ``sync``: ``@app.processor def enrich(order: Order) -> Order`` run by AppRunner;
* ``async``: the same as an ``async def``.

Each measurement runs in its own process (clean memory figures, no state shared
between runs), on fresh destinations that are deleted afterwards::

    .venv/bin/python benchmarks/processor.py --brokers memory,redis,rabbit,kafka \\
        --count 20000 --repeat 3

See benchmarks/README.md for what is timed and how to read the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from brokers import FIXTURES, Fixture, Order, RunNames, enrich_order

HERE = Path(__file__).resolve().parent
MODES = ("raw", "sync", "async")
BROKERS = ("memory", "redis", "rabbit", "kafka")
POLL_SECONDS = 0.002


# -- memory figures -----------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} is not in /proc/self/status")


def collect_garbage() -> None:
    """Collect before the baseline (a function of its own, so that profiles of a
    measurement can leave it out)."""
    gc.collect()


def reset_peak_rss() -> None:
    """Reset VmHWM (the peak RSS) to the current RSS (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


# -- one measurement (runs in a child process) --------------------------------------


class Progress:
    """Counts handler calls; the first stamps the start, the ``count``-th signals.

    Called from the handler: on the event loop (async) or in the worker thread that
    runs a sync handler's batch (one at a time, with one lane).
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.calls = 0
        self.first: float | None = None
        self.done = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    def hit(self) -> None:
        self.calls += 1
        if self.first is None:
            self.first = time.perf_counter()
        if self.calls == self.count:
            if threading.get_ident() == self._loop_thread:
                self.done.set()
            else:
                self._loop.call_soon_threadsafe(self.done.set)


def build_app(mode: str, progress: Progress) -> Any:
    from streamkit import StreamApp

    app = StreamApp("bench")
    if mode == "sync":

        @app.processor(name="enrich")
        def enrich_sync(order: Order) -> Order:
            progress.hit()
            return enrich_order(order)

    else:

        @app.processor(name="enrich")
        async def enrich_async(order: Order) -> Order:
            progress.hit()
            return enrich_order(order)

    return app


def streamkit_settings(fixture: Fixture, defaults: bool) -> dict[str, Any]:
    names = fixture.names
    consumer = (
        {} if defaults else {"prefetch": fixture.prefetch, "batch_size": fixture.batch}
    )
    return {
        "binders": {"bus": fixture.binder_settings()},
        "default_binder": "bus",
        "shutdown_timeout": 10,
        "bindings": {
            "enrich-in-0": {
                "destination": names.input,
                "group": names.group,
                "consumer": consumer,
            },
            "enrich-out-0": {
                "destination": names.output,
                "producer": fixture.producer_options(),
            },
        },
    }


async def until(check: Any, timeout: float, what: str) -> None:
    """Poll the async ``check`` until it is true; TimeoutError naming ``what``."""
    try:
        async with asyncio.timeout(timeout):
            # The broker is polled: it has no event to wait for.
            while not await check():  # noqa: ASYNC110
                await asyncio.sleep(POLL_SECONDS)
    except TimeoutError:
        raise TimeoutError(f"{what} did not happen within {timeout:g} s") from None


async def run_streamkit(
    fixture: Fixture, mode: str, defaults: bool, timeout: float
) -> tuple[float, float, float, float]:
    """(start, first handler call, outputs on the broker, inputs settled) stamps."""
    from streamkit.config import validate_settings
    from streamkit.runtime import AppRunner

    progress = Progress(fixture.count)
    settings = validate_settings(streamkit_settings(fixture, defaults))
    runner = AppRunner(build_app(mode, progress), settings)
    start = time.perf_counter()
    await runner.start()
    try:
        async with asyncio.timeout(timeout):
            await progress.done.wait()

        async def published() -> bool:
            return await fixture.outputs() >= fixture.count

        await until(published, timeout, "all outputs on the broker")
        done = time.perf_counter()
        await until(fixture.settled, 30, "all inputs settled on the broker")
        settled = time.perf_counter()
    finally:
        await runner.stop()
    assert progress.first is not None
    return start, progress.first, done, settled


async def run_raw(
    fixture: Fixture, timeout: float
) -> tuple[float, float, float, float]:
    first: list[float] = []
    start = time.perf_counter()
    async with asyncio.timeout(timeout):
        await fixture.run_raw(lambda: first.append(time.perf_counter()))
    done = time.perf_counter()
    return start, first[0], done, done


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    fixture = FIXTURES[args.broker](
        RunNames(args.run), args.count, args.batch, args.prefetch
    )
    timeout = 120 + args.count / 100
    if fixture.prefill_in_process:
        await fixture.prefill(raw=args.mode == "raw")
    # Everything either mode imports is imported before the baseline, so that
    # module code counts in neither mode's memory growth.
    import streamkit.runtime  # noqa: F401

    fixture.new_binder()
    await fixture.open_observer()
    try:
        collect_garbage()
        reset_peak_rss()
        rss_before = _status_kib("VmRSS")
        if args.tracemalloc:
            tracemalloc.start()
        if args.mode == "raw":
            stamps = await run_raw(fixture, timeout)
        else:
            stamps = await run_streamkit(fixture, args.mode, args.defaults, timeout)
        peak_rss = _status_kib("VmHWM")
        traced_peak = tracemalloc.get_traced_memory()[1] if args.tracemalloc else None
        tracemalloc.stop()
        outputs = await fixture.outputs()
        sample = await fixture.last_output()
    finally:
        await fixture.cleanup()
    start, first, done, settled = stamps
    seconds = done - first
    enriched = sample is not None and Order.model_validate_json(sample).status
    return {
        "broker": args.broker,
        "mode": args.mode,
        "count": args.count,
        "batch": args.batch,
        "prefetch": None if args.defaults and args.mode != "raw" else args.prefetch,
        "tracemalloc": args.tracemalloc,
        "seconds": seconds,
        "rate": args.count / seconds,
        "startup_seconds": first - start,
        "settle_lag_seconds": settled - done,
        "rss_before_kib": rss_before,
        "rss_growth_kib": peak_rss - rss_before,
        "tracemalloc_peak_kib": None if traced_peak is None else traced_peak // 1024,
        "outputs": outputs,
        "output_ok": enriched == "enriched",
    }


async def prefill(args: argparse.Namespace) -> None:
    fixture = FIXTURES[args.broker](
        RunNames(args.run), args.count, args.batch, args.prefetch
    )
    await fixture.prefill(raw=args.mode == "raw")


def child_main(args: argparse.Namespace) -> int:
    if args.prefill:
        asyncio.run(prefill(args))
        return 0
    result = asyncio.run(measure(args))
    print(json.dumps(result), flush=True)
    return 0


# -- the whole run (parent) ---------------------------------------------------------


@contextlib.contextmanager
def kafka_address(needed: bool) -> Iterator[None]:
    """STREAMKIT_KAFKA_BOOTSTRAP for the children: the configured Kafka, or a Tansu
    started here for the whole run."""
    if not needed or os.environ.get("STREAMKIT_KAFKA_BOOTSTRAP"):
        yield
        return
    os.environ.setdefault("STREAMKIT_TANSU_LOG_DIR", tempfile.mkdtemp("-tansu"))
    from streamkit_kafka.testing import kafka_bootstrap

    with kafka_bootstrap() as (bootstrap, _):
        os.environ["STREAMKIT_KAFKA_BOOTSTRAP"] = bootstrap
        try:
            yield
        finally:
            del os.environ["STREAMKIT_KAFKA_BOOTSTRAP"]


def run_child(args: argparse.Namespace, broker: str, mode: str, trace: bool) -> Any:
    run = uuid.uuid4().hex[:10]
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--run", run,
        "--broker", broker,
        "--mode", mode,
        "--count", str(args.count),
        "--batch", str(args.batch),
        "--prefetch", str(args.prefetch),
    ]  # fmt: skip
    if trace:
        command.append("--tracemalloc")
    if args.defaults:
        command.append("--defaults")
    if not FIXTURES[broker].prefill_in_process:
        filled = subprocess.run(
            [*command, "--prefill"], capture_output=True, text=True, check=False
        )
        if filled.returncode != 0:
            sys.stderr.write(filled.stderr)
            return {"broker": broker, "mode": mode, "error": filled.stderr[-2000:]}
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        return {"broker": broker, "mode": mode, "error": proc.stderr.strip()[-2000:]}
    if proc.stderr.strip():
        sys.stderr.write(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def _ratio(top: float | None, bottom: float | None) -> float | None:
    if top is None or not bottom:
        return None
    return top / bottom


def summarize(runs: list[dict[str, Any]], brokers: list[str]) -> list[dict[str, Any]]:
    rows = []
    for broker in brokers:
        row: dict[str, Any] = {"broker": broker}
        for mode in MODES:
            timed = [
                r
                for r in runs
                if r["broker"] == broker
                and r["mode"] == mode
                and "error" not in r
                and not r["tracemalloc"]
            ]
            traced = [
                r
                for r in runs
                if r["broker"] == broker
                and r["mode"] == mode
                and "error" not in r
                and r["tracemalloc"]
            ]
            row[f"{mode}_rate"] = _median(timed, "rate")
            row[f"{mode}_rss_growth_kib"] = _median(timed, "rss_growth_kib")
            row[f"{mode}_tracemalloc_peak_kib"] = _median(
                traced, "tracemalloc_peak_kib"
            )
            row[f"{mode}_settle_lag_seconds"] = _median(timed, "settle_lag_seconds")
            row[f"{mode}_runs"] = len(timed)
        for mode in ("sync", "async"):
            row[f"{mode}_speed_ratio"] = _ratio(row[f"{mode}_rate"], row["raw_rate"])
            row[f"{mode}_rss_ratio"] = _ratio(
                row[f"{mode}_rss_growth_kib"], row["raw_rss_growth_kib"]
            )
            row[f"{mode}_tracemalloc_ratio"] = _ratio(
                row[f"{mode}_tracemalloc_peak_kib"], row["raw_tracemalloc_peak_kib"]
            )
        rows.append(row)
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| broker | raw msg/s | streamkit sync msg/s | streamkit async msg/s "
        "| sync/raw | async/raw | RSS growth MiB raw / sync / async "
        "| RSS ratio sync / async | tracemalloc ratio sync / async |"
    )
    lines = [head, "|" + " --- |" * 9]
    for row in rows:
        rss = " / ".join(
            _fmt(
                None if row[f"{m}_rss_growth_kib"] is None
                else row[f"{m}_rss_growth_kib"] / 1024,
                ".1f",
            )
            for m in MODES
        )  # fmt: skip
        lines.append(
            f"| {row['broker']} | {_fmt(row['raw_rate'], ',.0f')} "
            f"| {_fmt(row['sync_rate'], ',.0f')} | {_fmt(row['async_rate'], ',.0f')} "
            f"| {_fmt(row['sync_speed_ratio'], '.2f')} "
            f"| {_fmt(row['async_speed_ratio'], '.2f')} | {rss} "
            f"| {_fmt(row['sync_rss_ratio'], '.2f')} / "
            f"{_fmt(row['async_rss_ratio'], '.2f')} "
            f"| {_fmt(row['sync_tracemalloc_ratio'], '.2f')} / "
            f"{_fmt(row['async_tracemalloc_ratio'], '.2f')} |"
        )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    versions = {}
    for package in ("streamkit", "pydantic", "redis", "aio-pika", "aiokafka"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=HERE,
        check=False,
    ).stdout.strip()
    # Other engineers edit the tree while benchmarks run: record what was dirty.
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "streamkit", "binders"],
        capture_output=True,
        text=True,
        cwd=HERE,
        check=False,
    ).stdout.split("\n")
    return {
        "python": sys.version.split()[0],
        "git_dirty": [line.strip() for line in dirty if line.strip()],
        "cpus": os.cpu_count(),
        "versions": versions,
        "git_commit": commit,
    }


def parent_main(args: argparse.Namespace) -> int:
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    unknown = sorted(set(brokers) - set(BROKERS))
    if unknown:
        sys.exit(f"unknown broker(s): {', '.join(unknown)} (known: {BROKERS})")
    modes = [m.strip() for m in args.modes.split(",")]
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    env = environment()
    runs: list[dict[str, Any]] = []
    with kafka_address("kafka" in brokers):
        for broker in brokers:
            # Modes alternate within each repetition, so a change of load on the
            # shared machine hits raw and streamkit alike.
            plan = [(rep, m, False) for rep in range(args.repeat) for m in modes]
            if args.trace_runs:
                plan += [(0, m, True) for m in modes]
            for rep, mode, trace in plan:
                result = run_child(args, broker, mode, trace)
                runs.append({**result, "repeat": rep, "tracemalloc": trace})
                print(_progress_line(result, trace), flush=True)
    rows = summarize(runs, brokers)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": started.isoformat(timespec="seconds"),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "environment": env,
        "settings": {
            "count": args.count,
            "batch": args.batch,
            "prefetch": args.prefetch,
            "streamkit_consumer_defaults": args.defaults,
            "repeat": args.repeat,
        },
        "summary": rows,
        "runs": runs,
    }
    path = Path(args.json) if args.json else _default_json(started)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(rows))
    print(f"\nload average before {load_before}, after {os.getloadavg()}")
    print(f"results: {path}")
    return 1 if any("error" in r for r in runs) else 0


def _default_json(started: datetime.datetime) -> Path:
    return HERE / "results" / f"processor-{started:%Y%m%dT%H%M%SZ}.json"


def _progress_line(result: dict[str, Any], trace: bool) -> str:
    where = f"{result['broker']:>6} {result['mode']:>5}"
    if "error" in result:
        return f"{where}: FAILED ({result['error'].splitlines()[-1]})"
    if trace:
        return f"{where}: tracemalloc peak {result['tracemalloc_peak_kib']} KiB"
    return (
        f"{where}: {result['rate']:>8,.0f} msg/s  {result['seconds']:.2f} s  "
        f"rss +{result['rss_growth_kib'] / 1024:.1f} MiB  "
        f"startup {result['startup_seconds']:.2f} s  "
        f"settle lag {result['settle_lag_seconds']:.3f} s  "
        f"outputs {result['outputs']}{'' if result['output_ok'] else ' (BAD OUTPUT)'}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", default=",".join(BROKERS))
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument(
        "--batch", type=int, default=64, help="records per read, raw and streamkit"
    )
    parser.add_argument(
        "--prefetch", type=int, default=64, help="unacknowledged records held at once"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="run streamkit with its default consumer settings (prefetch 16)",
    )
    parser.add_argument(
        "--no-tracemalloc",
        dest="trace_runs",
        action="store_false",
        help="skip the extra untimed tracemalloc run per broker and mode",
    )
    parser.add_argument("--json", help="result file (default: benchmarks/results/)")
    # One measurement in this process (what the parent runs in each child).
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--run", default="dev", help=argparse.SUPPRESS)
    parser.add_argument("--prefill", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--tracemalloc", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    if args.child:
        return child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
