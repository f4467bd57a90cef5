"""A real linmod server process serving the fake engine (no weights): `python fake_server.py
--model-dir DIR [linmod-serve flags]`, for tests that need a live process but no trained model."""

from __future__ import annotations

import sys

from service.app import create_app
from service.artifact import ArtifactConfig
from service.cli import settings_from_args
from service.drain import serve
from service.engine import FakeEngine
from service.logs import configure_logging


def main(argv: list[str]) -> None:
    settings = settings_from_args(argv)
    configure_logging(settings.log_format, settings.log_level)
    config = ArtifactConfig.model_validate_json((settings.model_dir / "config.json").read_text())
    serve(create_app(settings, engine=FakeEngine(config)), settings)


if __name__ == "__main__":
    main(sys.argv[1:])
