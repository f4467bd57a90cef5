"""The import rule of docs/architecture.md, read from the source: service/ never imports torch,
model/ or export/; service/jobs never imports service/routes."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(source: str, package: str) -> Iterator[str]:
    """Every module an import statement in `source` names, at any depth (lazy imports too);
    relative imports are resolved against `package`."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base]) if base else ".".join(parent)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sources(package):
        package = ".".join(path.relative_to(ROOT).parts[:-1])
        for name in imported_modules(path.read_text(encoding="utf-8"), package):
            if any(name == f or name.startswith(f"{f}.") for f in forbidden):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return sorted(set(found))


def test_the_service_never_imports_torch_or_the_training_packages() -> None:
    assert sources("service")
    assert offenders("service", ("torch", "model", "export", "bench")) == []


def test_batch_jobs_never_import_the_http_routes() -> None:
    assert sources("service/jobs")
    assert offenders("service/jobs", ("service.routes",)) == []


@pytest.mark.parametrize("package", ["service", "model"])
def test_no_module_is_over_400_lines(package: str) -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in sources(package)
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400
    }
    assert long == {}, "split these by concern (STYLE.md: past 400 lines)"


def test_the_checker_sees_lazy_and_relative_imports() -> None:
    text = "def f():\n    import torch.nn\n\nfrom ..routes import deps\nfrom . import x\n"
    names = set(imported_modules(text, "service.jobs"))
    assert {"torch.nn", "service.routes", "service.routes.deps", "service.jobs.x"} <= names
