"""Shared test configuration: the binder conformance plugin for every test module."""

from __future__ import annotations

pytest_plugins = ["streamkit.conformance.plugin"]
