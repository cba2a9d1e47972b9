"""The binder conformance suite: one set of cases every binder must pass.

The suite ships inside the package so that a third-party binder can be held to the
same contract. It runs against *profiles*: a binder type plus a configuration (and,
optionally, a way to start its broker). Run it with::

    pytest --pyargs streamkit.conformance -p streamkit.conformance.plugin
    pytest --pyargs streamkit.conformance -p streamkit.conformance.plugin \\
        --profile redis                      # or STREAMKIT_PROFILES=memory,redis

(``-p ...plugin`` is not needed where a ``conftest.py`` already lists the plugin in
``pytest_plugins``, as streamkit's own ``tests/conftest.py`` does.)
``STREAMKIT_CONFORMANCE_SIZE=full`` runs the large variant of each case.

Writing a profile
-----------------
A plug-in exposes a function returning a list of :class:`BinderProfile` and
registers it under the ``streamkit.conformance`` entry-point group::

    [project.entry-points."streamkit.conformance"]
    redis = "streamkit_redis.conformance:profiles"

::

    def profiles() -> list[BinderProfile]:
        return [
            BinderProfile(
                name="redis",
                binder_type="redis",
                settings=lambda: {"url": os.environ.get("STREAMKIT_REDIS_URL", URL)},
                env=("STREAMKIT_REDIS_URL",),
                check=ping_redis,           # async def ping_redis(settings) -> None
            )
        ]

Fields:

``name``
    Unique profile name, used in test ids and by ``--profile``.
``binder_type``
    The binder's type name in the ``streamkit.binders`` group (``"memory"``, ...).
``settings``
    Called for every test binder; returns the binder settings as a dict (read
    environment variables here). Validated with the binder's ``settings_model``.
``consumer_options`` / ``producer_options``
    Per-binding option dicts, validated with the binder's ``consumer_options_model``
    / ``producer_options_model`` and put in every spec the suite builds.
``capabilities``
    Overrides of the binder's declared :class:`~streamkit.binder.Capabilities`
    fields for this profile (e.g. ``{"persistence": False}`` for a broker configured
    without it). Cases needing a missing capability are skipped with the reason.
``setup``
    Optional session-scoped hook: a callable returning a *sync* context manager that
    starts what the profile needs (e.g. a Tansu process on a free port) and yields a
    dict of settings merged over ``settings()`` (or ``None``). Entered once, on the
    first test of the profile; exited at the end of the session.
``check``
    Optional ``async def check(settings: dict) -> None`` raising any exception whose
    message says why the broker cannot be reached. Without it, the suite starts a
    binder and treats :class:`~streamkit.errors.BrokerUnavailable` as unreachable.
    Unreachable: under ``CI=true`` every test of the profile fails, elsewhere it is
    skipped with the reason.
``env``
    Names of the environment variables that point the profile at its broker; they
    are quoted in the "unreachable" message.
``receive_timeout``
    Seconds a case waits for expected deliveries before failing (the wait ends as
    soon as everything arrived). ``Capabilities.crash_recovery_seconds`` is added
    to it where a case depends on redelivery.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields, replace
from importlib.metadata import entry_points
from typing import Any

from ..binder import Capabilities, ConsumerSpec, ProducerSpec, binder_class

__all__ = [
    "ENTRY_POINT_GROUP",
    "BinderProfile",
    "discover_profiles",
]

ENTRY_POINT_GROUP = "streamkit.conformance"

SettingsFactory = Callable[[], Mapping[str, Any]]
SetupHook = Callable[[], AbstractContextManager[Mapping[str, Any] | None]]
CheckHook = Callable[[Mapping[str, Any]], Awaitable[None]]


def _no_settings() -> Mapping[str, Any]:
    return {}


@dataclass(frozen=True)
class BinderProfile:
    """A binder and a configuration the conformance suite runs against."""

    name: str
    binder_type: str
    settings: SettingsFactory = _no_settings
    consumer_options: Mapping[str, Any] = field(default_factory=dict)
    producer_options: Mapping[str, Any] = field(default_factory=dict)
    capabilities: Mapping[str, Any] = field(default_factory=dict)
    setup: SetupHook | None = None
    check: CheckHook | None = None
    env: tuple[str, ...] = ()
    receive_timeout: float = 15.0

    def __post_init__(self) -> None:
        known = {f.name for f in fields(Capabilities)}
        unknown = sorted(set(self.capabilities) - known)
        if unknown:
            raise ValueError(
                f"Profile {self.name!r} overrides unknown capabilities {unknown}; "
                f"known: {sorted(known)}."
            )

    def effective_capabilities(self, declared: Capabilities) -> Capabilities:
        """The binder's declared capabilities with this profile's overrides."""
        return replace(declared, **dict(self.capabilities))

    def consumer_spec(self, destination: str, **kwargs: Any) -> ConsumerSpec:
        """A consumer spec carrying this profile's consumer options."""
        model = binder_class(self.binder_type).consumer_options_model
        return ConsumerSpec(
            destination, options=model(**dict(self.consumer_options)), **kwargs
        )

    def producer_spec(self, destination: str, **kwargs: Any) -> ProducerSpec:
        """A producer spec carrying this profile's producer options."""
        model = binder_class(self.binder_type).producer_options_model
        return ProducerSpec(
            destination, options=model(**dict(self.producer_options)), **kwargs
        )


def discover_profiles(
    broken: dict[str, str] | None = None,
) -> list[BinderProfile]:
    """Every installed profile: memory first, then the entry points, by name.

    An entry point that fails to load raises, unless ``broken`` is given: then its
    error is stored there under the entry point's name and discovery goes on.
    ``STREAMKIT_PROFILES`` and ``--profile`` are applied by the pytest plugin.
    """
    from ..memory import conformance_profiles

    found = {p.name: p for p in conformance_profiles()}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.value.startswith("streamkit.memory:"):
            continue
        try:
            loaded = list(ep.load()())
            bad = [p for p in loaded if not isinstance(p, BinderProfile)]
            if bad:
                raise TypeError(
                    f"Entry point {ep.value!r} returned {bad[0]!r}, not a "
                    "streamkit.conformance.BinderProfile."
                )
        except Exception as exc:
            if broken is None:
                raise
            broken[ep.name] = f"{ep.value}: {type(exc).__name__}: {exc}"
            continue
        for profile in loaded:
            found.setdefault(profile.name, profile)
    return list(found.values())


def suite_size() -> str:
    """``"quick"`` (default) or ``"full"``, from ``STREAMKIT_CONFORMANCE_SIZE``."""
    size = os.environ.get("STREAMKIT_CONFORMANCE_SIZE", "quick").strip().lower()
    return "full" if size == "full" else "quick"
