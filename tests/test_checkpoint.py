"""Checkpoint bookkeeping without a process group: atomic `latest`, rotation, find_latest after kills, RNG state,
and the resume refusals (changed config listing keys, changed data naming the domain)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from versatune_ds.config.loading import load_config
from versatune_ds.dist import DistEnv
from versatune_ds.engine import checkpoint, resume_checks
from versatune_ds.errors import UserError

ENV = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=1, launcher="single")


class FakeEngine:
    """Stands in for TrainEngine.save: writes one file per tag, like DeepSpeed's shards."""

    def save(self, directory: str, tag: str, client_state: dict) -> None:
        folder = Path(directory) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mp_rank_00_model_states.pt").write_text(json.dumps(client_state))


def _save(run_dir: Path, step: int, keep_last: int = 2) -> Path:
    return checkpoint.save_checkpoint(FakeEngine(), run_dir, step=step, state={"x": step}, keep_last=keep_last, env=ENV)


def test_save_writes_state_then_latest_and_rotates(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        _save(tmp_path, step)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000006"]
    assert (root / "latest").read_text().strip() == "step_00000006"
    state = checkpoint.read_state(root / "step_00000006")
    assert state["step"] == 6 and state["x"] == 6 and state["world_size"] == 1
    assert (root / "step_00000006" / "rng_rank0.json").is_file()


def test_find_latest_ignores_half_written_and_recovers_a_missing_pointer(tmp_path: Path) -> None:
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    root = tmp_path / "checkpoints"
    (root / "step_00000006").mkdir()  # killed during the save: no state file
    assert checkpoint.find_latest(tmp_path) == root / "step_00000004"
    # Killed after the state file but before `latest` moved: the newer complete one wins.
    (root / "step_00000006" / checkpoint.STATE_FILE).write_text(json.dumps({"step": 6}))
    assert checkpoint.find_latest(tmp_path) == root / "step_00000006"
    (root / "latest").unlink()
    assert checkpoint.find_latest(root) == root / "step_00000006"
    assert checkpoint.find_latest(tmp_path / "nothing") is None


def test_resaving_a_step_replaces_its_stale_folder(tmp_path: Path) -> None:
    stale = tmp_path / "checkpoints" / "step_00000002"
    stale.mkdir(parents=True)
    (stale / "garbage").write_text("x")
    _save(tmp_path, 2)
    assert not (stale / "garbage").exists() and (stale / checkpoint.STATE_FILE).is_file()


def test_rotation_never_drops_the_only_complete_checkpoint(tmp_path: Path) -> None:
    _save(tmp_path, 2, keep_last=1)
    (tmp_path / "checkpoints" / "step_00000004").mkdir()  # a newer one being written
    assert checkpoint.find_latest(tmp_path).name == "step_00000002"
    _save(tmp_path, 4, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000004"]


def test_resolve_resume(tmp_path: Path) -> None:
    assert checkpoint.resolve_resume(tmp_path, "none") is None
    assert checkpoint.resolve_resume(tmp_path, "auto") is None
    folder = _save(tmp_path, 2)
    assert checkpoint.resolve_resume(tmp_path, "auto") == folder
    assert checkpoint.resolve_resume(tmp_path, str(folder)) == folder
    assert checkpoint.resolve_resume(tmp_path / "elsewhere", str(tmp_path)) == folder
    with pytest.raises(UserError, match="no complete checkpoint"):
        checkpoint.resolve_resume(tmp_path, str(tmp_path / "missing"))


def test_rng_state_round_trips_through_json() -> None:
    import torch

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    saved = json.loads(json.dumps(checkpoint.capture_rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    checkpoint.restore_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def _cfg(tmp_path: Path, *overrides: str):
    data = tmp_path / "a.jsonl"
    data.write_text("{}\n")
    return load_config(None, [f"model.path={tmp_path}", f"data.domains=[{{name: a, train: [{data}]}}, {{name: b, train: [{data}]}}]", *overrides])


def test_changed_config_is_refused_listing_the_keys(tmp_path: Path) -> None:
    state = resume_checks.config_state(_cfg(tmp_path))
    assert resume_checks.check_config_unchanged(state, _cfg(tmp_path), allow_change=False, where="c") == []
    # Keys that do not change results (logging, checkpoint cadence, run dir) may change.
    same = _cfg(tmp_path, "checkpoint.every=7", "train.log_every=3", "logging.tensorboard=true", "data.padding_free=false")
    assert resume_checks.check_config_unchanged(state, same, allow_change=False, where="c") == []
    # A checkpoint written before data.padding_free existed resumes.
    older = {"config": {**state["config"], "data": {k: v for k, v in state["config"]["data"].items() if k != "padding_free"}}}
    assert resume_checks.check_config_unchanged(older, _cfg(tmp_path), allow_change=False, where="c") == []
    changed = _cfg(tmp_path, "train.learning_rate=0.5", "mixture.block_size=32")
    with pytest.raises(UserError) as error:
        resume_checks.check_config_unchanged(state, changed, allow_change=False, where="c")
    message = str(error.value)
    assert "train.learning_rate: 2e-05 -> 0.5" in message and "mixture.block_size: 256 -> 32" in message
    assert "--allow-config-change" in message
    assert len(resume_checks.check_config_unchanged(state, changed, allow_change=True, where="c")) == 2


def test_changed_data_is_refused_naming_the_domain() -> None:
    state = {"domain_names": ["law", "code"], "data_fingerprints": ["aa", "bb"]}
    resume_checks.check_data_unchanged(state, ["law", "code"], ["aa", "bb"], where="c")
    with pytest.raises(UserError, match=r"domain 'code': its data changed") as error:
        resume_checks.check_data_unchanged(state, ["law", "code"], ["aa", "XX"], where="c")
    assert "'law'" not in str(error.value)
    with pytest.raises(UserError, match=r"domain 'math' is new; domain 'code' was removed"):
        resume_checks.check_data_unchanged(state, ["law", "math"], ["aa", "cc"], where="c")


def test_another_world_size_keeps_the_global_batch_by_changing_accumulation(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    cfg = _cfg(tmp_path, "train.micro_batch_size=2", "train.gradient_accumulation_steps=2")
    state = {**resume_checks.config_state(cfg), "world_size": 2, "global_batch_size": 8}
    assert resume_checks.keep_global_batch(state, cfg, 2, where="c") is cfg
    with caplog.at_level(logging.INFO, logger="versatune_ds.engine.resume_checks"):
        one = resume_checks.keep_global_batch(state, cfg, 1, where="c")
    assert one.train.gradient_accumulation_steps == 4 and one.train.micro_batch_size == 2
    assert "train.gradient_accumulation_steps 2 -> 4 keeps the global batch of 8 rows" in caplog.text
    assert resume_checks.keep_global_batch(state, cfg, 4, where="c").train.gradient_accumulation_steps == 1
    with pytest.raises(UserError) as error:  # 8 rows cannot be split over 3 ranks x 2 rows
        resume_checks.keep_global_batch(state, cfg, 3, where="c")
    message = str(error.value)
    assert "global batch of 8 rows" in message and "(1, 2, 4)" in message and "start a new run_dir" in message
    with pytest.raises(UserError, match="16 rows is more than that"):  # 8 ranks x 2 rows > 8 rows
        resume_checks.keep_global_batch(state, cfg, 8, where="c")
    # The same global batch written as another split is not a config change; another global batch is.
    split = _cfg(tmp_path, "train.micro_batch_size=4", "train.gradient_accumulation_steps=2")
    assert resume_checks.check_config_unchanged(state, split, allow_change=False, where="c", world_size=1) == []
    with pytest.raises(UserError, match=r"train\.micro_batch_size: 2 -> 4"):
        resume_checks.check_config_unchanged(state, split, allow_change=False, where="c", world_size=2)


def test_the_global_batch_of_older_checkpoints_is_derived_from_their_config(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "train.micro_batch_size=3", "train.gradient_accumulation_steps=2")
    assert resume_checks.saved_global_batch({**resume_checks.config_state(cfg), "world_size": 2}) == 12
