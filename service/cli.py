"""`linmod-serve`: every setting as a flag (over its LINMOD_* variable), then uvicorn."""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Sequence

from pydantic import ValidationError

from service.settings import Settings


def _choices(annotation: object) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None


def build_parser() -> argparse.ArgumentParser:
    """A flag per Settings field; unset flags fall back to the environment, then defaults."""
    parser = argparse.ArgumentParser(
        prog="linmod-serve",
        description="Serve a Linformer moderation model over HTTP with dynamic batching.",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"LINMOD_{name.upper()}"
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        help_text = f"{field.description} [env {env}; default {default!r}]"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif name == "model_dir":
            # Repeated: the first is model_dir, the others join model_dirs.
            parser.add_argument(flag, action="append", help=help_text + "; repeat to serve more")
        else:
            parser.add_argument(flag, choices=_choices(field.annotation), help=help_text)
    return parser


def settings_from_args(argv: Sequence[str] | None = None) -> Settings:
    """Settings from command-line flags over LINMOD_* variables; exits 2 on a bad value."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {name: value for name, value in vars(args).items() if value is not None}
    if "model_dir" in given:
        first, *more = given["model_dir"]
        given["model_dir"] = first
        if more:
            extra = given.get("model_dirs")
            given["model_dirs"] = [*more, *(extra.split(",") if extra else [])]
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        parser.error(problems)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse settings, set up logging and serve until SIGTERM/SIGINT, draining first."""
    from service.app import create_app
    from service.drain import serve
    from service.logs import configure_logging

    settings = settings_from_args(argv)
    configure_logging(settings.log_format, settings.log_level)
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main(sys.argv[1:])
