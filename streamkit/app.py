"""StreamApp and the decorators that turn plain functions into bound functions."""

from __future__ import annotations

import asyncio
import inspect
import typing
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from .errors import ConfigError
from .message import Headers, Message

__all__ = ["Bridge", "FunctionDef", "StreamApp"]

F = TypeVar("F", bound=Callable[..., Any])
Kind = Literal["producer", "processor", "consumer"]

_GENERATOR_ORIGINS = {
    AsyncIterator,
    typing.AsyncIterator,
    typing.AsyncGenerator,
    Iterator,
    typing.Iterator,
    typing.Generator,
}


@dataclass(frozen=True)
class FunctionDef:
    """A decorated function and what its signature says about its bindings."""

    name: str
    kind: Kind
    func: Callable[..., Any]
    input_type: Any  # payload type of the input (Any when unannotated)
    input_envelope: bool  # the function takes Message[T]
    output_type: Any
    is_async: bool
    is_async_gen: bool
    is_gen: bool

    @property
    def has_input(self) -> bool:
        return self.kind != "producer"

    @property
    def has_output(self) -> bool:
        return self.kind != "consumer"

    async def call(self, *args: Any) -> list[Any]:
        """Call the function; its results as a list (empty for None, many for a
        generator). Sync functions run in a worker thread, off the event loop."""
        if self.is_async_gen:
            return [item async for item in self.func(*args) if item is not None]
        if self.is_async:
            result = await self.func(*args)
        elif self.is_gen:
            return await asyncio.to_thread(_drain, self.func, args)
        else:
            result = await asyncio.to_thread(self.func, *args)
        return [] if result is None else [result]


def _drain(func: Callable[..., Any], args: tuple[Any, ...]) -> list[Any]:
    return [item for item in func(*args) if item is not None]


def _unwrap_message(annotation: Any) -> tuple[Any, bool]:
    if annotation is inspect.Parameter.empty:
        return Any, False
    if typing.get_origin(annotation) is Message:
        (inner,) = typing.get_args(annotation) or (Any,)
        return inner, True
    if annotation is Message:
        return Any, True
    return annotation, False


def _unwrap_output(annotation: Any) -> Any:
    if annotation is inspect.Signature.empty or annotation is None:
        return Any
    origin = typing.get_origin(annotation)
    if origin is not None and (origin in _GENERATOR_ORIGINS or _is_iter_abc(origin)):
        annotation = (typing.get_args(annotation) or (Any,))[0]
    inner, _ = _unwrap_message(annotation)
    return inner


def _is_iter_abc(origin: Any) -> bool:
    import collections.abc as cabc

    return origin in {
        cabc.AsyncIterator,
        cabc.AsyncGenerator,
        cabc.Iterator,
        cabc.Generator,
    }


def describe(
    func: Callable[..., Any], kind: Kind, name: str | None = None
) -> FunctionDef:
    """Inspect ``func`` and build its :class:`FunctionDef`."""
    fname = name or func.__name__
    try:
        hints = typing.get_type_hints(func)
    except Exception as exc:
        raise ConfigError(
            f"cannot resolve the type hints of function {fname!r}: {exc}"
        ) from exc
    params = [
        p
        for p in inspect.signature(func).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    wanted = 0 if kind == "producer" else 1
    if len(params) != wanted:
        raise ConfigError(
            f"a {kind} takes {wanted} positional parameter(s); "
            f"{fname}() takes {len(params)}"
        )
    input_type, envelope = Any, False
    if params:
        input_type, envelope = _unwrap_message(
            hints.get(params[0].name, inspect.Parameter.empty)
        )
    return FunctionDef(
        name=fname,
        kind=kind,
        func=func,
        input_type=input_type,
        input_envelope=envelope,
        output_type=_unwrap_output(hints.get("return", inspect.Signature.empty)),
        is_async=inspect.iscoroutinefunction(func),
        is_async_gen=inspect.isasyncgenfunction(func),
        is_gen=inspect.isgeneratorfunction(func),
    )


class Bridge:
    """Send to any destination from any code: ``await app.bridge.send(...)``.

    Usable while the app runs (from a handler, an HTTP endpoint or a startup hook).
    """

    def __init__(self, app: StreamApp) -> None:
        self._app = app

    async def send(
        self,
        destination: str,
        payload: Any,
        *,
        key: str | bytes | None = None,
        headers: Headers | None = None,
        content_type: str | None = None,
        binder: str | None = None,
    ) -> None:
        """Publish one message; returns once the broker has taken it."""
        runner = self._app.runner
        if runner is None:
            raise RuntimeError(
                "app.bridge.send() needs a running app: start it with `streamkit run` "
                "or streamkit.testing.TestStream"
            )
        message = Message(payload, headers=dict(headers or {}), key=key)
        await runner.send(
            destination, message, content_type=content_type, binder=binder
        )


class StreamApp:
    """A set of functions bound to destinations.

    >>> app = StreamApp("orders")
    >>> @app.processor
    ... def uppercase(text: str) -> str:
    ...     return text.upper()

    Run it with ``streamkit run module:app``, or drive it in tests with
    :class:`streamkit.testing.TestStream`.
    """

    def __init__(self, name: str = "streamkit") -> None:
        self.name = name
        self.functions: dict[str, FunctionDef] = {}
        self.bridge = Bridge(self)
        self.runner: Any = None  # the AppRunner while the app runs
        self._on_startup: list[Callable[[], Any]] = []
        self._on_shutdown: list[Callable[[], Any]] = []

    def _register(self, kind: Kind, func: Any, name: str | None) -> Any:
        def decorate(f: F) -> F:
            fdef = describe(f, kind, name)
            if fdef.name in self.functions:
                raise ConfigError(f"function {fdef.name!r} is registered twice")
            self.functions[fdef.name] = fdef
            return f

        return decorate(func) if func is not None else decorate

    @typing.overload
    def processor(self, func: F, *, name: str | None = None) -> F: ...
    @typing.overload
    def processor(
        self, func: None = None, *, name: str | None = None
    ) -> Callable[[F], F]: ...
    def processor(self, func: Any = None, *, name: str | None = None) -> Any:
        """Bind ``f-in-0`` to ``f-out-0``; returning ``None`` filters the input out."""
        return self._register("processor", func, name)

    @typing.overload
    def consumer(self, func: F, *, name: str | None = None) -> F: ...
    @typing.overload
    def consumer(
        self, func: None = None, *, name: str | None = None
    ) -> Callable[[F], F]: ...
    def consumer(self, func: Any = None, *, name: str | None = None) -> Any:
        """Bind ``f-in-0``; the function's result is ignored."""
        return self._register("consumer", func, name)

    @typing.overload
    def producer(self, func: F, *, name: str | None = None) -> F: ...
    @typing.overload
    def producer(
        self, func: None = None, *, name: str | None = None
    ) -> Callable[[F], F]: ...
    def producer(self, func: Any = None, *, name: str | None = None) -> Any:
        """Bind ``f-out-0``. A plain function is polled every ``poll_interval``
        seconds; an async generator is a source that runs until it returns."""
        return self._register("producer", func, name)

    def on_startup(self, func: F) -> F:
        """Run ``func`` (sync or async) once the bindings are attached."""
        self._on_startup.append(func)
        return func

    def on_shutdown(self, func: F) -> F:
        """Run ``func`` when the app stops, before the binders close."""
        self._on_shutdown.append(func)
        return func
