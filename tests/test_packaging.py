"""The sdist Beam ships to remote workers (``--setup_file``) holds every package.

Builds the sdist exactly as ``python -m build --sdist`` does, checks that every
Python file and asset of the four code folders is inside, then builds a wheel from
that sdist (what a worker's ``pip install`` does) and checks it installs them under
the single ``lookalike.*`` namespace.
"""

import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CODE_FOLDERS = ("model", "pipeline", "index", "serving")


def repo_files() -> list[str]:
    files = []
    for folder in CODE_FOLDERS:
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and (path.suffix == ".py" or "static" in path.parts):
                files.append(str(path.relative_to(REPO)))
    return sorted(files)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (path,) = out.glob("lookalike-*.tar.gz")
    return path


def test_sdist_contains_every_package_file(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = [f for f in repo_files() if f not in names]
    assert not missing, f"missing from sdist: {missing}"
    assert {"setup.py", "constraints.txt", "README.md"} <= names


def test_wheel_built_from_sdist_maps_folders_into_one_namespace(sdist, tmp_path):
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    (src,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "wheel"), str(src)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"lookalike/" + f for f in repo_files()}
    assert expected <= names, sorted(expected - names)
    assert not any(n.split("/")[0] in CODE_FOLDERS for n in names), "a folder was installed as a bare top-level package"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lookalike = lookalike.pipeline.cli:run" in zipfile.ZipFile(wheel).read(entry).decode()


def test_code_never_imports_bare_folder_names():
    bare = re.compile(rf"^\s*(from|import)\s+({'|'.join(CODE_FOLDERS)})\b", re.M)
    offenders = [
        str(p.relative_to(REPO))
        for folder in (*CODE_FOLDERS, "tests", "bench")
        for p in (REPO / folder).rglob("*.py")
        if bare.search(p.read_text(encoding="utf-8"))
    ]
    assert not offenders, f"use `lookalike.<pkg>` imports in {offenders}"


def test_ruff_finds_no_errors_or_likely_bugs():
    """BUILD.md's lint command, with the rules in pyproject.toml."""
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", "--no-cache", *CODE_FOLDERS, "tests", "bench", "setup.py"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
