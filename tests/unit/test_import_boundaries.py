"""The import contract between afina's packages (README, "Development"), read from the source:
every `import afina.X` / `from afina.X import ...`, at module level or inside a function.

- api -> jobs, serving, services, models, core (the HTTP process hosts the inference engine);
- worker -> jobs, services, models, core; serving -> models, core (no training code);
  jobs -> models, core; models -> core; migrations -> models, core; core -> nothing of afina;
- services (the composition root) -> anything but api and cli;
- cli (the entry point, which runs the API beside the embedded worker) -> anything: nothing
  else imports api.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

ALLOWED = {
    "api": {"jobs", "serving", "models", "core", "services"},
    "worker": {"jobs", "models", "core", "services"},
    "serving": {"models", "core"},
    "jobs": {"models", "core"},
    "models": {"core"},
    "migrations": {"models", "core"},
    "core": set(),
    "services": {"jobs", "serving", "worker", "models", "core"},
    "cli": {"api", "services", "jobs", "serving", "worker", "models", "core"},
}


def _part(path: Path) -> str:
    return path.relative_to(ROOT).parts[0]


def _imported(tree: ast.AST) -> set[str]:
    """The afina subpackages a module imports."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "afina":
                names.update(f"afina.{alias.name}" for alias in node.names)
    return {name.split(".")[1] for name in names if name.startswith("afina.")}


def _sources() -> list[Path]:
    return [path for name in ALLOWED for path in sorted((ROOT / name).rglob("*.py"))]


@pytest.mark.parametrize("path", _sources(), ids=lambda path: str(path.relative_to(ROOT)))
def test_a_module_imports_only_what_its_package_may(path):
    package = _part(path)
    imported = _imported(ast.parse(path.read_text(), str(path))) - {package}
    assert imported <= ALLOWED[package], f"{package} may not import {imported - ALLOWED[package]}"


def test_every_package_is_under_the_contract():
    packages = {
        path.name
        for path in ROOT.iterdir()
        if (path / "__init__.py").is_file() and path.name not in {"tests", "bench"}
    }
    assert packages <= set(ALLOWED)
