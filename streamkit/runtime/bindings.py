"""Which bindings an app has, and where each one points, given its settings."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from ..app import FunctionDef, StreamApp
from ..binder import Binder, binder_class
from ..config import BindingSettings, Settings, config_error
from ..converters import converter_for
from ..errors import ConfigError, UnsupportedContentType
from ..message import Message

__all__ = ["BoundFunction", "Composite", "ResolvedBinding", "resolve"]


class Composite:
    """``a|b|c`` from the ``functions`` setting: one function, run in-process.

    Each stage's outputs feed the next stage directly (no serialization); a stage
    that takes ``Message[T]`` gets the previous output wrapped in an envelope that
    keeps the input's headers and key.
    """

    def __init__(self, stages: list[FunctionDef]) -> None:
        for left, right in itertools.pairwise(stages):
            if not left.has_output or not right.has_input:
                raise ConfigError(
                    f"cannot compose {left.name}|{right.name}: {left.name} must "
                    f"produce output and {right.name} must take input",
                    key="functions",
                )
        self.stages = stages
        first, last = stages[0], stages[-1]
        self.name = "".join(s.name for s in stages)  # Spring's naming: a|b -> ab
        if first.kind == "producer":
            self.kind = "producer"
        elif last.kind == "consumer":
            self.kind = "consumer"
        else:
            self.kind = "processor"
        self.input_type = first.input_type
        self.input_envelope = first.input_envelope
        self.output_type = last.output_type

    @property
    def has_input(self) -> bool:
        return self.kind != "producer"

    @property
    def has_output(self) -> bool:
        return self.kind != "consumer"

    async def call(self, *args: Any) -> list[Any]:
        origin = args[0] if args and isinstance(args[0], Message) else None
        return await self._rest(await self.stages[0].call(*args), origin)

    async def feed(self, item: Any) -> list[Any]:
        """Run an item a source (the first stage) yielded through the other stages."""
        return await self._rest([item], None)

    async def _rest(self, values: list[Any], origin: Message[Any] | None) -> list[Any]:
        for stage in self.stages[1:]:
            next_values: list[Any] = []
            for value in values:
                next_values.extend(await stage.call(_adapt(value, stage, origin)))
            values = next_values
        return values


def _adapt(value: Any, stage: FunctionDef, origin: Message[Any] | None) -> Any:
    if stage.input_envelope and not isinstance(value, Message):
        if origin is None:
            return Message(value)
        return Message(
            value, headers=dict(origin.headers), key=origin.key, attempt=origin.attempt
        )
    if not stage.input_envelope and isinstance(value, Message):
        return value.payload
    return value


BoundFunction = FunctionDef | Composite


async def call_each(
    fn: BoundFunction, values: list[Any], stopping: Callable[[], bool]
) -> tuple[list[list[Any]], Exception | None]:
    """Call ``fn`` on each value in order, stopping at the first failure.

    Returns the results of the calls that succeeded and the exception of the one that
    failed (``None`` if all succeeded). A plain sync function runs the whole run in one
    worker-thread hop instead of one hop per value. No new call starts once
    ``stopping()`` is true, so fewer results and no exception mean "interrupted".
    """
    if isinstance(fn, FunctionDef) and not (fn.is_async or fn.is_async_gen):
        return await asyncio.to_thread(_call_each_sync, fn, values, stopping)
    results: list[list[Any]] = []
    for value in values:
        if stopping():
            break
        try:
            results.append(await fn.call(value))
        except Exception as exc:
            return results, exc
    return results, None


def _call_each_sync(
    fn: FunctionDef, values: list[Any], stopping: Callable[[], bool]
) -> tuple[list[list[Any]], Exception | None]:
    results: list[list[Any]] = []
    for value in values:
        if stopping():
            break
        try:
            if fn.is_gen:
                results.append([x for x in fn.func(value) if x is not None])
            else:
                result = fn.func(value)
                results.append([] if result is None else [result])
        except Exception as exc:
            return results, exc
    return results, None


@dataclass(frozen=True)
class ResolvedBinding:
    """One binding after configuration: where it points and through which binder."""

    name: str
    function: str
    direction: str  # "in" or "out"
    destination: str
    group: str | None
    binder: str
    binder_type: str
    settings: BindingSettings
    options: BaseModel  # the binder's consumer or producer options, validated


def bound_functions(app: StreamApp, settings: Settings) -> list[BoundFunction]:
    """The functions to bind: all of the app's, or those named in ``functions``."""
    if not settings.functions:
        return list(app.functions.values())
    result: list[BoundFunction] = []
    for definition in settings.functions.split(";"):
        names = [n.strip() for n in definition.split("|")]
        unknown = [n for n in names if n not in app.functions]
        if unknown:
            raise ConfigError(
                f"functions: {', '.join(map(repr, unknown))} in {definition!r} is "
                f"not a function of the app (functions: "
                f"{', '.join(sorted(app.functions))})",
                key="functions",
            )
        stages = [app.functions[n] for n in names]
        result.append(stages[0] if len(stages) == 1 else Composite(stages))
    return result


def _options(
    binder_cls: type[Binder], binding: str, direction: str, settings: BindingSettings
) -> BaseModel:
    section = settings.consumer if direction == "in" else settings.producer
    model = (
        binder_cls.consumer_options_model
        if direction == "in"
        else binder_cls.producer_options_model
    )
    try:
        return model.model_validate(dict(section.model_extra or {}))
    except ValidationError as exc:
        sub = "consumer" if direction == "in" else "producer"
        raise config_error(exc, prefix=f"bindings.{binding}.{sub}") from None


def resolve(
    app: StreamApp, settings: Settings
) -> tuple[list[BoundFunction], list[ResolvedBinding]]:
    """Resolve every binding of the app; raises ConfigError naming the bad key."""
    functions = bound_functions(app, settings)
    resolved: list[ResolvedBinding] = []
    for fn in functions:
        directions = (["in"] if fn.has_input else []) + (
            ["out"] if fn.has_output else []
        )
        for direction in directions:
            name = f"{fn.name}-{direction}-0"
            bs = settings.binding(name)
            binder_name = bs.binder or settings.default_binder_name()
            try:
                binder_type = settings.binder_config(binder_name).type
            except ConfigError as exc:
                key = f"bindings.{name}.binder" if bs.binder else "default_binder"
                raise ConfigError(f"{key}: {exc}", key=key) from None
            cls, _ = binder_settings(settings, binder_name)
            _check_content_type(bs.content_type, name)
            resolved.append(
                ResolvedBinding(
                    name=name,
                    function=fn.name,
                    direction=direction,
                    destination=bs.destination or name,
                    group=bs.group,
                    binder=binder_name,
                    binder_type=binder_type,
                    settings=bs,
                    options=_options(cls, name, direction, bs),
                )
            )
    known = {b.name for b in resolved}
    for name in settings.bindings:
        if name not in known:
            raise ConfigError(
                f"bindings.{name} does not match a binding of the app "
                f"(bindings: {', '.join(sorted(known)) or 'none'})",
                key=f"bindings.{name}",
            )
    return functions, resolved


def _check_content_type(content_type: str, binding: str) -> None:
    try:
        converter_for(content_type)
    except UnsupportedContentType as exc:
        key = f"bindings.{binding}.content_type"
        raise ConfigError(f"{key}: {exc}", key=key) from None


def binder_settings(settings: Settings, name: str) -> tuple[type[Binder], BaseModel]:
    """The binder class for binder ``name`` and its validated settings."""
    config = settings.binder_config(name)
    try:
        cls = binder_class(config.type)
    except ConfigError as exc:
        key = f"binders.{name}.type"
        raise type(exc)(f"{key}: {exc}", key=key) from None
    try:
        return cls, cls.settings_model.model_validate(config.options())
    except ValidationError as exc:
        raise config_error(exc, prefix=f"binders.{name}") from None
