"""The operations endpoint: health, Prometheus metrics and binding control over HTTP.

Enabled with ``streamkit run APP --http 127.0.0.1:8080`` (needs the ``ops`` extra:
``pip install 'streamkit[ops]'``):

==================================  ===================================================
``GET /health``                     200 when every binder and binding is up, else
                                    503; the JSON body says which is down
``GET /metrics``                    Prometheus text format
``GET /bindings``                   every binding with its destination, group, binder
                                    and state
``POST /bindings/{name}/{action}``  ``pause`` / ``resume`` (stop taking messages,
                                    in-flight ones finish), ``stop`` / ``start``
                                    (detach and re-attach the consumer)
==================================  ===================================================

The counters are plain integers the pipeline keeps anyway; they are read at scrape
time, so metrics cost nothing on the per-message path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from .errors import ConfigError
from .runtime.runner import AppRunner

__all__ = ["OpsServer", "parse_address"]

logger = logging.getLogger(__name__)

_ACTIONS = ("pause", "resume", "stop", "start")


def parse_address(value: str) -> tuple[str, int]:
    """``host:port`` (or ``:port`` for all interfaces) as a tuple."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--http needs HOST:PORT, got {value!r}", key="http")
    return host or "0.0.0.0", int(port)


class _Collector:
    """A prometheus_client collector reading the runner's counters on scrape."""

    def __init__(self, runner: AppRunner) -> None:
        self.runner = runner

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counters = {
            name: CounterMetricFamily(
                f"streamkit_messages_{name}", help_text, labels=["binding"]
            )
            for name, help_text in (
                ("received", "Messages fetched from the broker."),
                ("processed", "Messages handled and acknowledged."),
                ("retried", "Failed handler attempts that were retried."),
                ("dead_lettered", "Messages sent to the dead-letter destination."),
            )
        }
        held = GaugeMetricFamily(
            "streamkit_messages_held",
            "Messages that failed for good with the DLQ off (left unacknowledged).",
            labels=["binding"],
        )
        up = GaugeMetricFamily(
            "streamkit_binding_up", "1 while the binding consumes.", labels=["binding"]
        )
        for name, pipeline in self.runner.inputs.items():
            stats = pipeline.stats
            counters["received"].add_metric([name], stats.received)
            counters["processed"].add_metric([name], stats.processed)
            counters["retried"].add_metric([name], stats.retried)
            counters["dead_lettered"].add_metric([name], stats.dead_lettered)
            held.add_metric([name], stats.held)
            up.add_metric([name], 1.0 if pipeline.healthy else 0.0)
        yield from counters.values()
        yield held
        yield up


class OpsServer:
    """Serves the endpoint for one running app."""

    def __init__(self, runner: AppRunner, host: str, port: int) -> None:
        try:
            from aiohttp import web
            from prometheus_client import CollectorRegistry
        except ImportError as exc:
            raise ConfigError(
                "the HTTP endpoint needs the ops extra: pip install 'streamkit[ops]'",
                key="http",
            ) from exc
        self.runner = runner
        self.host = host
        self.port = port
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(runner))
        self._app = web.Application()
        self._app.router.add_get("/health", self._health)
        self._app.router.add_get("/metrics", self._metrics)
        self._app.router.add_get("/bindings", self._bindings)
        self._app.router.add_post("/bindings/{name}/{action}", self._control)
        self._runner: Any = None

    async def start(self) -> None:
        from aiohttp import web

        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self.close()
            raise ConfigError(
                f"--http {self.host}:{self.port}: cannot listen there ({exc.strerror})",
                key="http",
            ) from None
        server = site._server
        if self.port == 0 and server is not None:  # an OS-chosen port (tests)
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        logger.info("ops endpoint on http://%s:%d", self.host, self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: Any) -> Any:
        from aiohttp import web

        report = await self.runner.health()
        return web.json_response(
            report, status=200 if report["status"] == "up" else 503
        )

    async def _metrics(self, request: Any) -> Any:
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _bindings(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response(self.runner.describe_bindings())

    async def _control(self, request: Any) -> Any:
        from aiohttp import web

        name = request.match_info["name"]
        action = request.match_info["action"]
        pipeline = self.runner.inputs.get(name)
        if pipeline is None or action not in _ACTIONS:
            raise web.HTTPNotFound(
                text=f"no input binding {name!r} or action {action!r} "
                f"(actions: {', '.join(_ACTIONS)})"
            )
        if action in ("pause", "resume") and pipeline.state == "stopped":
            raise web.HTTPConflict(
                text=f"binding {name!r} is stopped: POST .../start to attach it again"
            )
        if action == "pause":
            pipeline.pause()
        elif action == "resume":
            pipeline.resume()
        elif action == "stop":
            await pipeline.stop(self.runner.settings.shutdown_timeout)
        else:
            await pipeline.start()
        logger.info("binding %s: %s requested over HTTP", name, action)
        return web.json_response({"binding": name, "state": pipeline.state})
