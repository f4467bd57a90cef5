"""Settings: LINMOD_* variables, a flag for every field, flags over variables, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import build_parser, settings_from_args
from service.settings import Settings, get_settings


def test_every_setting_is_a_flag() -> None:
    flags = {a.dest for a in build_parser()._actions if a.option_strings}
    assert set(Settings.model_fields) <= flags
    help_text = build_parser().format_help()
    for flag in ("--model-dir", "--max-batch-tokens", "--long-document", "--api-keys"):
        assert flag in help_text
    assert "LINMOD_MAX_WAIT_MS" in help_text


def test_environment_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINMOD_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("LINMOD_DEVICE", "cpu")
    monkeypatch.setenv("LINMOD_API_KEYS", "a, b,,c")
    s = settings_from_args(["--device", "cuda", "--long-document", "truncate", "--no-warmup"])
    assert s.max_batch_size == 7 and s.device == "cuda"
    assert s.long_document == "truncate" and s.warmup is False
    assert s.api_keys == ["a", "b", "c"]
    assert settings_from_args(["--api-keys", "x,y"]).api_keys == ["x", "y"]
    assert settings_from_args(["--model-dir", "m"]).model_dir == Path("m")


def test_defaults() -> None:
    s = Settings()
    assert (s.device, s.precision, s.long_document, s.chunk_aggregation) == (
        "auto", "auto", "chunk", "max"
    )  # fmt: skip
    assert s.api_keys == [] and s.port == 8000 and s.chunk_overlap is None


def test_bad_values_exit_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--device", "tpu"], ["--max-batch-size", "0"], ["--port", "http"]):
        with pytest.raises(SystemExit) as exited:
            settings_from_args(argv)
        assert exited.value.code == 2
    assert "max_batch_size" in capsys.readouterr().err


def test_settings_are_built_once_on_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    get_settings.cache_clear()
    monkeypatch.setenv("LINMOD_PORT", "9001")
    assert get_settings() is get_settings() and get_settings().port == 9001
    get_settings.cache_clear()


def test_the_server_refuses_to_start_without_a_model(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "--model-dir", str(tmp_path), "--port", "0",
         "--log-format", "text"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "config.json" in result.stderr


def test_serving_never_imports_torch() -> None:
    code = (
        "import sys, service.app, service.cli, service.engine, service.batcher; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'model', 'export')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
