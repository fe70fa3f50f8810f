"""Bad model folders (tests/bad_inputs/models/): exit code 2, the expected message, no traceback.

Each case `<case>.json` describes a model folder built from the tiny test model:
  config    keys merged into its config.json (a `model_type` key replaces the config entirely)
  weights   keep | none | garbage (a file of junk bytes) | truncate (the safetensors cut in half)
  commands  which commands to run on it: check-config / train (on configs/sample_tiny.yaml with model.path=the
            folder and data.seq_len=`seq_len`) and eval (`--model <folder> --heldout law=data/sample/law.jsonl`)
with a sidecar `<case>.expect` of regular expressions that must all be found in stderr.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CASES = sorted((REPO / "tests" / "bad_inputs" / "models").glob("*.json"))
SAMPLE_CONFIG = REPO / "configs" / "sample_tiny.yaml"


def _build(case: dict, tiny_model_dir: Path, folder: Path) -> Path:
    shutil.copytree(tiny_model_dir, folder)
    config_path = folder / "config.json"
    config = case["config"] if "model_type" in case["config"] else {**json.loads(config_path.read_text()), **case["config"]}
    config_path.write_text(json.dumps(config))
    weights = folder / "model.safetensors"
    if case["weights"] == "none":
        weights.unlink()
    elif case["weights"] == "garbage":
        weights.write_bytes(b"this is not a safetensors file\n" * 64)
    elif case["weights"] == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    return folder


def _argv(command: str, case: dict, folder: Path, tmp_path: Path) -> list[str]:
    if command == "eval":
        return ["eval", "--model", str(folder), "--heldout", f"law={REPO / 'data' / 'sample' / 'law.jsonl'}"]
    overrides = [f"model.path={folder}", f"data.seq_len={case.get('seq_len', 256)}", f"train.run_dir={tmp_path / 'run'}",
                 f"data.cache_dir={tmp_path / 'cache'}"]
    return [command, "--config", str(SAMPLE_CONFIG), *overrides]


@pytest.mark.parametrize("case_file", CASES, ids=[p.stem for p in CASES])
def test_bad_model_folder(case_file: Path, tiny_model_dir: Path, tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    case = json.loads(case_file.read_text())
    folder = _build(case, tiny_model_dir, tmp_path / "model")
    expectations = [line for line in case_file.with_suffix(".expect").read_text().splitlines() if line.strip()]
    for command in case["commands"]:
        code, _, err = run_cli(_argv(command, case, folder, tmp_path))
        assert "Traceback" not in err, f"{command}: traceback instead of a message:\n{err}"
        assert code == 2, f"{command}: exit code {code}:\n{err}"
        for pattern in expectations:
            assert re.search(pattern, err), f"{command}: {pattern!r} not found in:\n{err}"
        assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any work


def test_every_model_case_has_an_expectation() -> None:
    assert len(CASES) >= 4
    for case in CASES:
        assert case.with_suffix(".expect").is_file(), case
        assert {"config", "weights", "commands"} <= set(json.loads(case.read_text())), case
