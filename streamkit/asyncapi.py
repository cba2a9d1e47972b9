"""An AsyncAPI 3.0 document generated from an app's bindings and their types."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from .app import StreamApp
from .config import Settings
from .runtime.bindings import resolve

__all__ = ["asyncapi_document"]


def _schema(python_type: Any) -> dict[str, Any]:
    try:
        return TypeAdapter(python_type).json_schema()
    except Exception:  # a type pydantic cannot describe: say nothing rather than lie
        return {}


def asyncapi_document(app: StreamApp, settings: Settings) -> dict[str, Any]:
    """Channels are destinations; a function's input binding is a ``receive``
    operation, its output binding a ``send`` operation."""
    functions, bindings = resolve(app, settings)
    types = {
        fn.name: (getattr(fn, "input_type", Any), getattr(fn, "output_type", Any))
        for fn in functions
    }
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for binding in bindings:
        in_type, out_type = types[binding.function]
        python_type = in_type if binding.direction == "in" else out_type
        message_name = f"{binding.name}-message"
        channel = channels.setdefault(
            binding.destination, {"address": binding.destination, "messages": {}}
        )
        channel["messages"][message_name] = {
            "name": message_name,
            "contentType": binding.settings.content_type,
            "payload": _schema(python_type),
        }
        operation: dict[str, Any] = {
            "action": "receive" if binding.direction == "in" else "send",
            "channel": {"$ref": f"#/channels/{binding.destination}"},
            "messages": [
                {"$ref": f"#/channels/{binding.destination}/messages/{message_name}"}
            ],
        }
        if binding.group:
            operation["x-group"] = binding.group
        operations[binding.name] = operation
    return {
        "asyncapi": "3.0.0",
        "info": {"title": app.name, "version": "1.0.0"},
        "channels": channels,
        "operations": operations,
    }
