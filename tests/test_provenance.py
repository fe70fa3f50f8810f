"""provenance: the source commit is read only from a checkout that tracks the package, and each start of `train`
appends one record (the loop's resume test checks the run directory's file)."""

from __future__ import annotations

import json
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

from versatune_ds import __version__
from versatune_ds.provenance import PROVENANCE_FILE, record_start, source_commit


def _git(repo: Path, *args: str) -> str:
    env_args = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    return subprocess.run(["git", *env_args, "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_source_commit_needs_the_package_file_tracked(tmp_path: Path) -> None:
    package = tmp_path / "repo" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    assert source_commit(package) is None  # no checkout at all
    _git(tmp_path / "repo", "init", "-q")
    assert source_commit(package) is None  # a checkout, but the file is not tracked (a venv inside a repo)
    _git(tmp_path / "repo", "add", "pkg/__init__.py")
    _git(tmp_path / "repo", "commit", "-q", "-m", "first")
    head = _git(tmp_path / "repo", "rev-parse", "HEAD")
    assert source_commit(package) == {"commit": head, "dirty": False}
    (package / "__init__.py").write_text("x = 2\n")
    assert source_commit(package) == {"commit": head, "dirty": True}
    (package / "other.txt").write_text("untracked files do not make it dirty\n")
    (package / "__init__.py").write_text("x = 1\n")
    assert source_commit(package) == {"commit": head, "dirty": False}


def test_record_start_appends_one_line_per_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first = record_start(tmp_path / "run", resumed_from=None, world_size=2)
    second = record_start(tmp_path / "run", resumed_from=tmp_path / "run" / "checkpoints" / "step_00000008", world_size=4)
    lines = [json.loads(line) for line in (tmp_path / "run" / PROVENANCE_FILE).read_text().splitlines()]
    assert lines == [first, second]
    assert [r["resumed_from"] for r in lines] == [None, str(tmp_path / "run" / "checkpoints" / "step_00000008")]
    assert [r["world_size"] for r in lines] == [2, 4]
    assert first["versatune_ds"] == __version__ and first["slurm_job_id"] == "4242"
    assert first["torch"] == version("torch") and first["transformers"] == version("transformers")
