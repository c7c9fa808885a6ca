"""What `pip install .` gives a user: the wheel built from this tree holds every subpackage
(models/, data/, methods/, plots/, ...), found by package discovery rather than a hand list,
and its metadata states the Python it really needs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("sparse_training", "landscape", "cli")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of what git would check out, so that setuptools' build/ and egg-info
    # never land in the source tree and nothing left over from a development install counts.
    source = tmp_path_factory.mktemp("source")
    for name in TOP_LEVEL:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300)
    (found,) = out.glob("sparse_landscape-*.whl")
    return found


def test_the_wheel_holds_every_package_of_the_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(str(init.parent.relative_to(ROOT)) for top in TOP_LEVEL for init in (ROOT / top).rglob("__init__.py"))
    assert {"sparse_training/models", "sparse_training/data", "landscape/plots"} <= set(packages)
    missing = [package for package in packages if f"{package}/__init__.py" not in names]
    assert not missing, f"the wheel lacks {missing}"
    modules = sorted(str(p.relative_to(ROOT)) for top in TOP_LEVEL for p in (ROOT / top).rglob("*.py"))
    assert [m for m in modules if m not in names] == []
    assert not any(name.startswith("tests/") for name in names)


def test_the_wheel_states_the_python_and_the_command(wheel):
    archive = zipfile.ZipFile(wheel)
    metadata_name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = Parser().parsestr(archive.read(metadata_name).decode())
    assert metadata["Requires-Python"] == ">=3.11"  # tomllib is 3.11's
    requires = metadata.get_all("Requires-Dist")
    assert any(r.startswith("torch>=") for r in requires) and not any(r.startswith("torch==") for r in requires)
    entry_points = next(n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "landscape = cli.main:main" in archive.read(entry_points).decode()
