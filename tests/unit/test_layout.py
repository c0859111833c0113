"""The package's floors and its one import root.

Imports go one way: the kernel (``fleet_telemetry.core``) imports nothing else of the
project, each stage or domain imports only the floors below it, and nothing but the
command line imports ``fleet_telemetry.cli``. The wheel installs one import package,
``fleet_telemetry``, so the project never shadows another distribution's
``schema``, ``deploy`` or ``bench``.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "fleet_telemetry"

# What each part of the package may import, besides itself and the kernel.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "schema": set(),
    "ingest": set(),
    "trips": set(),
    "consumers": {"ingest", "trips"},
    "lifecycle": {"schema", "trips", "documents"},
    "deploy": {"schema"},
    "replay": {"ingest", "consumers", "lifecycle", "trips"},
    "fleetops": {"ingest", "consumers"},
    "documents": {"fleetops"},
    "notify": {"ingest", "consumers"},
    "views": {"schema", "deploy", "ingest", "consumers", "lifecycle", "replay", "fleetops", "trips"},
}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name, the linked folders included."""
    found: dict[str, Path] = {}
    paths = [Path(folder, name) for folder, _, files in os.walk(PACKAGE, followlinks=True)
             for name in files if name.endswith(".py")]
    for path in sorted(paths):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(("fleet_telemetry", *parts))] = path
    return found


def imported(path: Path, module: str) -> set[str]:
    """The ``fleet_telemetry`` modules that ``path`` imports, relative imports resolved."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.add(node.module)
    return {name for name in names if name == "fleet_telemetry" or name.startswith("fleet_telemetry.")}


def floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_part_of_the_package_has_a_floor() -> None:
    parts = {floor(name) for name in modules()} - {""}
    assert parts - {"cli"} == set(ALLOWED), "a new part of the package needs its row in ALLOWED"


def test_imports_only_go_down() -> None:
    upward = []
    for module, path in modules().items():
        part = floor(module)
        if part in ("", "cli"):
            continue
        allowed = ALLOWED[part] | {part, "core"}
        for target in imported(path, module):
            if floor(target) not in allowed:
                upward.append(f"{module} imports {target}")
    assert upward == []


def test_only_the_command_line_imports_the_command_line() -> None:
    callers = [
        f"{module} imports {target}"
        for module, path in modules().items() if floor(module) != "cli"
        for target in imported(path, module) if floor(target) == "cli"
    ]
    assert callers == []


def test_the_wheel_installs_one_import_root(tmp_path: Path) -> None:
    # Built from a copy of the tracked files: a build leaves a build/ folder behind.
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        origin = ROOT / name
        if origin.is_symlink():
            target.symlink_to(os.readlink(origin))
        elif origin.exists():
            shutil.copy2(origin, target)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("fleet_telemetry-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"fleet_telemetry"}
    # The linked folders travel as real files, with their data.
    assert "fleet_telemetry/consumers/sink.py" in names
    assert any(name.startswith("fleet_telemetry/schema/migrations/0001_") for name in names)
