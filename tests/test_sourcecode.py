"""Project rules checked as tests: one reader of GWCORE_*, every variable documented, no fallback."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

from gwcore.config import BUILD_VARIABLES, TEST_PREFIX, variables

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_only_config_reads_the_environment():
    offenders = []
    for path in (ROOT / "gwcore").rglob("*.py*"):
        if path.suffix not in (".py", ".pyx") or path.name == "config.py":
            continue
        text = path.read_text()
        if re.search(r"os\.environ|getenv\(|environ\.get", text):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_every_variable_is_documented():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    missing = [name for name in variables() if f"`{name}`" not in doc]
    assert missing == []
    # and the docs do not describe variables that do not exist
    documented = {name for name in re.findall(r"`(GWCORE_[A-Z0-9_]+)`", doc) if not name.startswith(TEST_PREFIX)}
    assert documented - set(variables()) - BUILD_VARIABLES == set()
    # and every build flag setup.py reads is documented
    setup_flags = set(re.findall(r'_flag\("(GWCORE_[A-Z0-9_]+)"\)', (ROOT / "setup.py").read_text()))
    assert setup_flags and setup_flags <= BUILD_VARIABLES
    assert [name for name in BUILD_VARIABLES if f"`{name}`" not in doc] == []


def test_missing_extension_stops_loudly(tmp_path):
    # Hide the compiled module: importing gwcore must fail with instructions, not fall back.
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'gwcore._dedup':\n"
        "            raise ImportError('simulated: extension not built')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import gwcore\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode != 0
    assert "ExtensionMissingError" in res.stderr
    assert "make compile" in res.stderr and "no pure-Python fallback" in res.stderr


def test_readme_quick_start_has_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s*\n+```[a-z]*\n(.*?)```", readme, re.S)
    assert block, "README needs a Quick start code block"
    commands = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    assert commands[1].strip() in (ROOT / ".ci" / "run").read_text()


def _mypy_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("mypy") is not None


def test_typecheck_and_stubtest():
    import pytest

    if not _mypy_available():
        pytest.skip("mypy is not installed (it comes with the dev extra)")
    res = subprocess.run([sys.executable, "-m", "mypy", "gwcore"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    # the .pyi must describe the compiled module exactly
    res = subprocess.run([sys.executable, "-m", "mypy.stubtest", "gwcore._dedup"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_module_is_in_the_code_layout():
    # docs/architecture.md's table names every Python module, and nothing that is gone
    section = (ROOT / "docs" / "architecture.md").read_text().split("## Code layout", 1)[1]
    listed = set(re.findall(r"`(gwcore/[^`]+)`", section))
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "gwcore").rglob("*.py")}
    assert sorted(modules - listed) == []
    assert sorted(name for name in listed if not list(ROOT.glob(name))) == []


def test_every_error_is_exported():
    import gwcore
    import gwcore.errors

    assert [name for name in gwcore.errors.__all__ if name not in gwcore.__all__] == []


def _imported_top_modules(path: pathlib.Path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.partition(".")[0])
    return names


def test_the_rabbitmq_client_is_an_extra_that_declares_what_is_imported():
    import tomllib

    from gwcore.gateway import BROKER_CLIENT_MODULES

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("-", "_") for r in requirements}

    assert names(project["dependencies"]) & set(BROKER_CLIENT_MODULES) == set()
    assert names(project["optional-dependencies"]["rabbitmq"]) == set(BROKER_CLIENT_MODULES)
    # every module of the client that gwcore imports is one the extra declares
    imported = _imported_top_modules(ROOT / "gwcore" / "amqp.py")
    for path in (ROOT / "gwcore" / "selected").glob("*.py"):
        imported |= _imported_top_modules(path)
    assert {"aio_pika", "aiormq", "pamqp"} <= imported
    # the test suite's install (make test, and so .ci/run) has the extra
    assert re.search(r"pip install .*-e '\.\[[^]]*\brabbitmq\b", (ROOT / "Makefile").read_text())


def test_the_postgresql_client_is_an_extra_that_declares_what_is_imported():
    import tomllib

    from gwcore.gateway import PG_CLIENT_MODULES

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in project["optional-dependencies"]["postgresql"]}
    assert declared == set(PG_CLIENT_MODULES)
    assert not declared & {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in project["dependencies"]}
    imported = set()
    for path in (ROOT / "gwcore").rglob("*.py"):
        if "asyncpg" in _imported_top_modules(path):
            imported.add(path.relative_to(ROOT / "gwcore").parts[0])
    assert imported == {"pgsql"}  # only the mode's package imports it
    assert re.search(r"pip install .*-e '\.\[[^]]*\bpostgresql\b", (ROOT / "Makefile").read_text())


def test_license_file_and_spdx_expression():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) the gwcore authors" in text
    assert "LICENSE" in (ROOT / "MANIFEST.in").read_text()


def test_every_serial_test_exists():
    """``make test`` runs tests/ci.py SERIAL alone after the rest: a prefix that names nothing
    (a renamed file or test) would let that test run beside the others."""
    import ci

    for prefix, why in ci.SERIAL.items():
        assert why, prefix
        path, _, name = prefix.partition("::")
        assert (ROOT / path).is_file(), f"SERIAL names {path}, which does not exist"
        if name:
            assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), \
                f"SERIAL names {prefix}, which is not a test there"
