"""The code base keeps the shape a newcomer can live in: small modules and functions, stage boundaries as the README
states them, and a type checker that passes (mypy, configured in pyproject.toml)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PRODUCT = ("llmcf", "ranker", "storage", "streams", "generators")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
# A module over the limit says why in its docstring, in a paragraph that starts with this phrase.
LONG_MODULE_REASON = "Why one module:"

# Imports that would break a stage boundary: (importing package, imported package, why not).
FORBIDDEN_IMPORTS = (
    ("ranker", "streams", "what the ranker and the worker share lives in llmcf/"),
    ("storage", "streams", "storage knows nothing of the stages that call it"),
    ("storage", "ranker", "storage knows nothing of the stages that call it"),
    ("storage", "generators", "storage knows nothing of the stages that call it"),
    ("generators", "streams", "the generator pool talks to the worker through Kafka only"),
    ("bench", "tests", "benchmarks and tests share helpers through testkit/"),
)


def _python_files(*packages: str) -> list[Path]:
    return sorted(path for package in packages for path in (ROOT / package).rglob("*.py"))


def _imported_packages(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_product_modules_stay_short_or_say_why():
    long = []
    for path in _python_files(*PRODUCT):
        lines = path.read_text().count("\n")
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_MODULE_LINES and LONG_MODULE_REASON not in docstring:
            long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not long, f"modules over {MAX_MODULE_LINES} lines without a '{LONG_MODULE_REASON}' paragraph: {long}"


def test_functions_stay_short():
    long = []
    for path in _python_files(*PRODUCT, "bench"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize(("importer", "imported", "why"), FORBIDDEN_IMPORTS)
def test_stage_boundaries_hold(importer, imported, why):
    crossing = [str(path.relative_to(ROOT)) for path in _python_files(importer) if imported in _imported_packages(path)]
    assert not crossing, f"{importer}/ must not import {imported}/ ({why}): {crossing}"


def test_the_boundary_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "module.py"
    module.write_text("def f():\n    from streams.decisions import CotPolicy\n    import tests.fixtures\n")
    assert _imported_packages(module) == {"streams", "tests"}


@pytest.mark.slow
def test_mypy_finds_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy-cache")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
