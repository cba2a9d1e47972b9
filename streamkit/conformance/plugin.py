"""The pytest plugin of the conformance suite: profile selection and fixtures.

Enable it with ``pytest_plugins = ["streamkit.conformance.plugin"]`` in a top-level
``conftest.py`` or ``-p streamkit.conformance.plugin`` on the command line. It needs
pytest-asyncio (``pip install 'streamkit[test]'``).

Fixtures:

``profile``
    An :class:`ActiveProfile`, parametrized over the selected profiles (all
    discovered ones unless ``--profile NAME`` or ``STREAMKIT_PROFILES=a,b`` says
    otherwise). Tests marked ``@pytest.mark.capability("persistence", ...)`` are
    skipped, with the reason, on profiles lacking one of those capabilities.
``binder_factory``
    ``await binder_factory()`` returns a new started binder of the profile; every
    binder it made is closed after the test, twice, to check that close is
    idempotent and returns promptly.
``binder``
    One binder from ``binder_factory``.
``names``
    A :class:`~streamkit.conformance.helpers.Names`: fresh destination and group
    names.

An unreachable broker (the profile's ``setup`` or ``check`` failed) fails every
test of the profile when ``CI=true`` and skips them elsewhere; the reasons are
repeated at the end of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio

from ..binder import Binder, Capabilities, ConsumerSpec, ProducerSpec, binder_class
from ..errors import BrokerUnavailable
from . import BinderProfile, discover_profiles, suite_size
from .helpers import Names, broker_unreachable

__all__ = ["ActiveProfile"]

logger = logging.getLogger(__name__)

#: Bound on a binder's start, health check and close in the fixtures.
LIFECYCLE_TIMEOUT = 30.0

BinderFactory = Callable[[], Awaitable[Binder]]


@dataclass
class ActiveProfile:
    """A profile as one test sees it: merged settings and effective capabilities.

    ``settings`` is computed once per test, so every binder a test makes talks to
    the same broker (a second binder is a restart or another instance).
    """

    profile: BinderProfile
    settings: dict[str, Any]
    capabilities: Capabilities
    size: str = field(default_factory=suite_size)

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def full(self) -> bool:
        return self.size == "full"

    def sized(self, quick: int, full: int) -> int:
        """``quick`` or ``full`` depending on ``STREAMKIT_CONFORMANCE_SIZE``."""
        return full if self.full else quick

    def timeout(self, *, recovery: bool = False) -> float:
        """How long to wait for expected deliveries; plus recovery time if asked."""
        extra = self.capabilities.crash_recovery_seconds or 0.0
        return self.profile.receive_timeout + (extra if recovery else 0.0)

    def consumer_spec(self, destination: str, **kwargs: Any) -> ConsumerSpec:
        return self.profile.consumer_spec(destination, **kwargs)

    def producer_spec(self, destination: str, **kwargs: Any) -> ProducerSpec:
        return self.profile.producer_spec(destination, **kwargs)

    def require(self, *names: str) -> None:
        """Skip the test unless the profile has every named capability."""
        missing = [n for n in names if not getattr(self.capabilities, n)]
        if missing:
            pytest.skip(
                f"profile {self.name!r} lacks capability {', '.join(missing)} "
                "(declared by the binder or overridden by the profile)"
            )


@dataclass
class _State:
    """Per-session state: profiles, entered setups, reachability verdicts."""

    profiles: dict[str, BinderProfile]
    broken: dict[str, str] = field(default_factory=dict)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    setup_settings: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)
    checked: set[str] = field(default_factory=set)


_STATE = pytest.StashKey[_State]()


# -- hooks -----------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("streamkit-conformance", "streamkit binder conformance")
    group.addoption(
        "--profile",
        action="append",
        default=[],
        metavar="NAME",
        help="run the conformance suite on these profiles only (repeat or comma-"
        "separate; default: $STREAMKIT_PROFILES, else every installed profile)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "capability(*names): skip the test on profiles lacking these capabilities",
    )
    broken: dict[str, str] = {}
    config.stash[_STATE] = _State(_select_profiles(config, broken), broken)


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is not None:
        state.stack.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "profile" not in metafunc.fixturenames:
        return
    state = metafunc.config.stash[_STATE]
    # A plug-in whose profiles cannot load shows up as failing tests, not as a
    # crash of the whole run.
    names = [*state.profiles, *(f"broken:{ep}" for ep in state.broken)]
    metafunc.parametrize("profile", names, indirect=True, ids=names)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None or not state.unreachable:
        return
    terminalreporter.section("streamkit conformance: brokers not reached", sep="!")
    for name, reason in state.unreachable.items():
        terminalreporter.line(f"{name}: {reason}")


def _select_profiles(
    config: pytest.Config, broken: dict[str, str]
) -> dict[str, BinderProfile]:
    given = config.getoption("profile") or [os.environ.get("STREAMKIT_PROFILES", "")]
    wanted = [n.strip() for opt in given for n in opt.split(",") if n.strip()]
    available = {p.name: p for p in discover_profiles(broken)}
    if wanted:
        broken_wanted = {k: v for k, v in broken.items() if k in wanted}
        broken.clear()
        broken.update(broken_wanted)
        wanted = [n for n in wanted if n not in broken_wanted]
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise pytest.UsageError(
            f"Unknown conformance profile(s) {', '.join(unknown)}; installed: "
            f"{', '.join(available)}. A binder plug-in adds its profiles through the "
            "'streamkit.conformance' entry-point group."
        )
    return {n: available[n] for n in wanted} if wanted else available


# -- reachability ----------------------------------------------------------------------


def _unreachable(profile: BinderProfile, reason: str) -> str:
    where = (
        f"set {' / '.join(profile.env)} to a running broker"
        if profile.env
        else "start its broker"
    )
    return (
        f"profile {profile.name!r}: broker not reachable: {reason.rstrip('.')}. "
        "To run these "
        f"tests, {where}. (With CI=true this fails the run instead of skipping.)"
    )


def _setup_settings(state: _State, profile: BinderProfile) -> Mapping[str, Any]:
    """Enter the profile's session setup once; its failure makes it unreachable."""
    if (
        profile.name not in state.setup_settings
        and profile.name not in state.unreachable
    ):
        try:
            got = state.stack.enter_context(profile.setup()) if profile.setup else None
        except Exception as exc:  # the reason is reported, the session goes on
            state.unreachable[profile.name] = _unreachable(
                profile, f"setup failed: {type(exc).__name__}: {exc}"
            )
        else:
            state.setup_settings[profile.name] = dict(got or {})
    if profile.name in state.unreachable:
        broker_unreachable(state.unreachable[profile.name])
    return state.setup_settings[profile.name]


async def _check_reachable(state: _State, active: ActiveProfile) -> None:
    profile = active.profile
    if profile.name not in state.checked:
        state.checked.add(profile.name)
        try:
            async with asyncio.timeout(LIFECYCLE_TIMEOUT):
                await _probe(active)
        except (BrokerUnavailable, TimeoutError, OSError) as exc:
            state.unreachable[profile.name] = _unreachable(
                profile, f"{type(exc).__name__}: {exc}"
            )
    if profile.name in state.unreachable:
        broker_unreachable(state.unreachable[profile.name])


async def _probe(active: ActiveProfile) -> None:
    if active.profile.check is not None:
        try:
            await active.profile.check(active.settings)
        except Exception as exc:
            raise BrokerUnavailable(str(exc) or type(exc).__name__) from exc
        return
    binder = _new_binder(active)
    try:
        await binder.start()
    finally:
        await binder.close()


def _new_binder(active: ActiveProfile) -> Binder:
    cls = binder_class(active.profile.binder_type)
    settings = cls.settings_model(**active.settings)
    return cls(settings, name=f"conformance-{active.name}")


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture
def profile(request: pytest.FixtureRequest) -> ActiveProfile:
    state = request.config.stash[_STATE]
    if request.param.startswith("broken:"):
        ep = request.param.removeprefix("broken:")
        pytest.fail(
            f"conformance profiles of {ep!r} failed to load: {state.broken[ep]}"
        )
    chosen = state.profiles[request.param]
    base = _setup_settings(state, chosen)
    cls = binder_class(chosen.binder_type)
    active = ActiveProfile(
        profile=chosen,
        settings={**chosen.settings(), **base},
        capabilities=chosen.effective_capabilities(cls.capabilities),
    )
    for mark in request.node.iter_markers("capability"):
        active.require(*mark.args)
    return active


@pytest_asyncio.fixture
async def binder_factory(
    profile: ActiveProfile, request: pytest.FixtureRequest
) -> AsyncIterator[BinderFactory]:
    await _check_reachable(request.config.stash[_STATE], profile)
    made: list[Binder] = []

    async def make() -> Binder:
        binder = _new_binder(profile)
        made.append(binder)
        async with asyncio.timeout(LIFECYCLE_TIMEOUT):
            await binder.start()
        return binder

    yield make

    for binder in made:
        for _ in range(2):  # the second close checks idempotence
            async with asyncio.timeout(LIFECYCLE_TIMEOUT):
                await binder.close()
    _forget_memory_broker(profile)


@pytest_asyncio.fixture
async def binder(binder_factory: BinderFactory) -> Binder:
    return await binder_factory()


@pytest.fixture
def names() -> Names:
    return Names()


def _forget_memory_broker(active: ActiveProfile) -> None:
    # The memory profile gives each test a private broker; dropping it keeps a long
    # session's memory flat.
    if active.profile.binder_type == "memory" and "broker" in active.settings:
        from ..memory import drop_broker

        drop_broker(active.settings["broker"])
