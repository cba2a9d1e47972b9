"""The ops endpoint: health, metrics and binding control over real HTTP."""

from __future__ import annotations

import aiohttp
import pytest

from streamkit import ConfigError, StreamApp
from streamkit.ops import OpsServer
from streamkit.testing import Recorder, TestStream


async def test_health_metrics_and_pause_resume_over_http() -> None:
    app = StreamApp()
    seen = Recorder()

    @app.consumer
    async def count(n: int) -> None:
        seen.add(n)
        if n == 2:
            raise RuntimeError("two is bad")

    settings = {
        "bindings": {
            "count-in-0": {"group": "g", "consumer": {"max_attempts": 1}},
        }
    }
    async with TestStream(app, settings) as stream:
        assert stream.runner is not None
        server = OpsServer(stream.runner, "127.0.0.1", 0)
        await server.start()
        base = f"http://127.0.0.1:{server.port}"
        try:
            async with aiohttp.ClientSession() as http:
                for n in (1, 2, 3):
                    await stream.send("count-in-0", n)
                await seen.wait_count(3)
                await stream.receive_dead_letter("count-in-0")

                health = await (await http.get(f"{base}/health")).json()
                metrics = await (await http.get(f"{base}/metrics")).text()
                paused = await (
                    await http.post(f"{base}/bindings/count-in-0/pause")
                ).json()
                await stream.send("count-in-0", 4)
                await stream.assert_nothing("count-in-0.g.dlq", within=0.2)
                held_back = list(seen.items)
                resumed = await (
                    await http.post(f"{base}/bindings/count-in-0/resume")
                ).json()
                await seen.wait_count(4)
                listing = await (await http.get(f"{base}/bindings")).json()
                missing = await http.post(f"{base}/bindings/nope/pause")
        finally:
            await server.close()

    assert health["status"] == "up"
    assert health["bindings"] == {"count-in-0": "up"}
    assert 'streamkit_messages_processed_total{binding="count-in-0"} 2.0' in metrics
    assert 'streamkit_messages_dead_lettered_total{binding="count-in-0"} 1.0' in metrics
    assert held_back == [1, 2, 3]
    assert paused["state"] == "paused"
    assert resumed["state"] == "running"
    assert listing[0]["name"] == "count-in-0" and listing[0]["state"] == "running"
    assert missing.status == 404


async def test_a_deliberately_stopped_binding_is_not_unhealthy_and_cannot_resume() -> (
    None
):
    app = StreamApp()

    @app.consumer
    async def idle(n: int) -> None: ...

    async with TestStream(app, {"bindings": {"idle-in-0": {"group": "g"}}}) as stream:
        assert stream.runner is not None
        server = OpsServer(stream.runner, "127.0.0.1", 0)
        await server.start()
        base = f"http://127.0.0.1:{server.port}"
        try:
            async with aiohttp.ClientSession() as http:
                stopped = await http.post(f"{base}/bindings/idle-in-0/stop")
                health = await http.get(f"{base}/health")
                resume = await http.post(f"{base}/bindings/idle-in-0/resume")
                started = await http.post(f"{base}/bindings/idle-in-0/start")
                report = await health.json()
                state = (await started.json())["state"]
        finally:
            await server.close()

    assert stopped.status == 200
    assert health.status == 200 and report["bindings"] == {"idle-in-0": "stopped"}
    assert resume.status == 409
    assert state == "running"


async def test_http_port_in_use_is_a_clear_error() -> None:
    app = StreamApp()

    @app.consumer
    async def idle(n: int) -> None: ...

    async with TestStream(app) as stream:
        assert stream.runner is not None
        first = OpsServer(stream.runner, "127.0.0.1", 0)
        await first.start()
        try:
            second = OpsServer(stream.runner, "127.0.0.1", first.port)
            with pytest.raises(ConfigError, match="cannot listen there"):
                await second.start()
        finally:
            await first.close()
