"""The runtime: bindings lifecycle, the consume -> handle -> publish -> ack pipeline,
retries and dead letters, partition selection, shutdown."""

from __future__ import annotations

from .bindings import ResolvedBinding, resolve
from .runner import AppRunner, run_app

__all__ = ["AppRunner", "ResolvedBinding", "resolve", "run_app"]
