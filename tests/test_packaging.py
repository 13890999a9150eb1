"""The installed layout: one top-level name (`gelato`) in the wheel, every source folder inside it.

`device/`, `edge/` and `benchmarks/` install as `gelato.device`, `gelato.edge`, `gelato.benchmarks`
(pyproject's package-dir). These tests build the real wheel and read its file list, and scan the
sources so that nothing imports the folders by their bare names (which work from a checkout only
because pytest puts the repository root on sys.path).
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"gelato": "gelato", "device": "gelato.device", "edge": "gelato.edge", "benchmarks": "gelato.benchmarks"}
BARE = frozenset(FOLDERS) - {"gelato"}  # folders that install under another name


def _packages_on_disk() -> set[str]:
    """Every folder with an __init__.py, named as it installs."""
    names = set()
    for folder, installed in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            names.add(".".join((installed, *rel)))
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of the sources: built in the checkout, setuptools reuses its `build/lib`,
    which keeps every module ever built there (a deleted one stayed in the wheel)."""
    out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE", "NOTICE"):
        shutil.copy(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "results", "*.pyc")
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, src / folder, ignore=skip)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (path,) = out.glob("gelato-*.whl")
    return path


@pytest.fixture(scope="module")
def wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def test_installed_wheel_imports_and_runs(wheel: Path, tmp_path: Path) -> None:
    """Installed from the wheel (not this checkout), the entry modules import and a CLI answers --help."""
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import gelato.device.cli, gelato.edge.cli, gelato.benchmarks.bench, gelato.benchmarks.load,"
        " gelato.benchmarks.load_fuzz;"
        "print(gelato.device.cli.__file__, gelato.edge.cli.__file__, gelato.benchmarks.bench.__file__,"
        " gelato.benchmarks.load.__file__)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(site)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert all(f.startswith(str(site)) for f in run.stdout.split()), run.stdout
    env = {**os.environ, "PYTHONPATH": str(site)}
    cli = [sys.executable, "-m", "gelato.edge.cli", "--help"]
    help_run = subprocess.run(cli, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and "--max-ahead-rounds" in help_run.stdout, help_run.stderr


def test_wheel_installs_one_top_level_name(wheel_names: list[str]) -> None:
    tops = {name.split("/")[0] for name in wheel_names}
    assert tops == {"gelato", next(t for t in tops if t.endswith(".dist-info"))}, tops


def test_wheel_holds_every_source_package(wheel_names: list[str]) -> None:
    in_wheel = {name.rsplit("/", 1)[0].replace("/", ".") for name in wheel_names if name.endswith("/__init__.py")}
    assert in_wheel == _packages_on_disk()
    for module in ("gelato/device/cli.py", "gelato/edge/server.py", "gelato/benchmarks/bench.py"):
        assert module in wheel_names


def test_console_scripts_point_into_the_namespace() -> None:
    """The installed entry points (editable here, the same metadata as a wheel) load from `gelato.*`."""
    scripts = {
        e.name: e for e in importlib.metadata.entry_points(group="console_scripts") if e.name.startswith("gelato-")
    }
    assert set(scripts) >= {"gelato-edge", "gelato-device", "gelato-demo", "gelato-bench", "gelato-energy"}
    for entry in scripts.values():
        assert entry.value.startswith("gelato."), entry
        assert callable(entry.load()), entry


def _bare_imports(path: Path, banned: frozenset[str] = BARE) -> list[str]:
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        bad += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in banned]
    return bad


def test_no_source_imports_a_folder_by_its_bare_name() -> None:
    files = [p for d in (*FOLDERS, "tests") for p in (ROOT / d).rglob("*.py") if "v1" not in p.parts]
    bad = [hit for p in files for hit in _bare_imports(p)]
    assert not bad, bad


def test_installed_code_never_imports_the_tests() -> None:
    """`tests/` is not in the wheel: a benchmark that imported it would work from a checkout only."""
    files = [p for d in FOLDERS for p in (ROOT / d).rglob("*.py") if "v1" not in p.parts]
    bad = [hit for p in files for hit in _bare_imports(p, frozenset({"tests"}))]
    assert not bad, bad
