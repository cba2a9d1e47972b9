"""The ``streamkit`` command.

Exit codes: 0 success, 1 a runtime failure (a broker that cannot be reached, a crash),
2 a usage or configuration error (the message names the bad option or key).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import sys
from typing import Any

import click
import yaml

from .app import StreamApp
from .config import Settings, load_settings, redact
from .errors import ConfigError, StreamkitError
from .runtime.bindings import binder_settings, resolve
from .runtime.runner import AppRunner

__all__ = ["main"]

EXIT_FAILURE = 1
EXIT_CONFIG = 2


def load_app(target: str) -> StreamApp:
    """Import ``module:attribute`` (the working directory is importable)."""
    module_name, _, attribute = target.partition(":")
    attribute = attribute or "app"
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise click.BadParameter(
                f"cannot import module {module_name!r}: run from the directory that "
                "holds it, or give its dotted path",
                param_hint="APP",
            ) from exc
        raise
    app = getattr(module, attribute, None)
    if not isinstance(app, StreamApp):
        raise click.BadParameter(
            f"{module_name}:{attribute} is not a StreamApp", param_hint="APP"
        )
    return app


def _settings(
    config: str | None, overrides: tuple[str, ...], binder: str | None
) -> Settings:
    pairs = list(overrides)
    if binder:
        pairs.append(f"default_binder={binder}")
    return load_settings(config, pairs)


def _fail(exc: StreamkitError) -> None:
    code = EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILURE
    click.echo(f"error: {exc}", err=True)
    sys.exit(code)


_config_option = click.option(
    "--config",
    "-c",
    "config",
    type=click.Path(dir_okay=False),
    help="YAML or TOML config file (default: $STREAMKIT_CONFIG or ./streamkit.yaml).",
)
_set_option = click.option(
    "--set",
    "-s",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a setting, e.g. bindings.enrich-in-0.group=billing. Repeatable.",
)
_binder_option = click.option(
    "--binder", "-b", help="Name of the binder bindings use unless they say otherwise."
)


@click.group()
@click.version_option(package_name="streamkit")
def main() -> None:
    """Run event-driven functions on Kafka, RabbitMQ, Redis Streams or in memory."""


@main.command()
@click.argument("app_path", metavar="APP")
@_config_option
@_set_option
@_binder_option
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option(
    "--http",
    metavar="HOST:PORT",
    help="Serve /health, /metrics and /bindings (needs the ops extra).",
)
def run(
    app_path: str,
    config: str | None,
    overrides: tuple[str, ...],
    binder: str | None,
    log_level: str,
    http: str | None,
) -> None:
    """Run APP (module:attribute) until Ctrl-C or SIGTERM."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    app = load_app(app_path)
    try:
        settings = _settings(config, overrides, binder)
        runner = AppRunner(app, settings)
        services = []
        if http:
            from .ops import OpsServer, parse_address

            services.append(OpsServer(runner, *parse_address(http)))
        asyncio.run(runner.run(services))
    except StreamkitError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        pass


@main.command()
@click.argument("app_path", metavar="APP")
@_config_option
@_set_option
@_binder_option
def bindings(
    app_path: str, config: str | None, overrides: tuple[str, ...], binder: str | None
) -> None:
    """Print the resolved bindings of APP: destination, group, binder."""
    app = load_app(app_path)
    try:
        _, resolved = resolve(app, _settings(config, overrides, binder))
    except StreamkitError as exc:
        _fail(exc)
    rows = [("BINDING", "DESTINATION", "GROUP", "BINDER")]
    rows += [
        (
            b.name,
            b.destination,
            b.group or "(anonymous)" if b.direction == "in" else "",
            f"{b.binder} ({b.binder_type})",
        )
        for b in resolved
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        click.echo(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        )


@main.command()
@click.argument("app_path", metavar="APP")
@_config_option
@_set_option
@_binder_option
def asyncapi(
    app_path: str, config: str | None, overrides: tuple[str, ...], binder: str | None
) -> None:
    """Print an AsyncAPI 3.0 document (JSON) of APP's bindings and payload types."""
    from .asyncapi import asyncapi_document

    app = load_app(app_path)
    try:
        document = asyncapi_document(app, _settings(config, overrides, binder))
    except StreamkitError as exc:
        _fail(exc)
    click.echo(json.dumps(document, indent=2))


@main.command("config")
@_config_option
@_set_option
@_binder_option
def show_config(
    config: str | None, overrides: tuple[str, ...], binder: str | None
) -> None:
    """Print the effective configuration, secrets redacted."""
    try:
        settings = _settings(config, overrides, binder)
        data: dict[str, Any] = settings.model_dump(mode="json")
        for name, binder_config in settings.binders.items():
            _, validated = binder_settings(settings, name)
            # Every binder setting with its default, not only the keys given.
            data["binders"][name] = {
                "type": binder_config.type,
                **validated.model_dump(mode="json"),
            }
    except StreamkitError as exc:
        _fail(exc)
    click.echo(yaml.safe_dump(redact(data), sort_keys=False), nl=False)


if __name__ == "__main__":  # pragma: no cover
    main()
