"""Every shipped config (configs/*.yaml) validates, and the shipped sample data (data/sample) is well formed.

The cluster configs name data under /data/... that does not exist here: they are validated fully except
for file existence (`check_files=False`), and with file checks on, the only problems must be missing files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from versatune_ds.config.loading import load_config
from versatune_ds.config.schema import DEFAULT_DOMAIN_NAMES, ConfigError, RunConfig
from versatune_ds.engine.ds_config import resolve_ds_config_path
from versatune_ds.resources import shipped_path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SAMPLE = REPO / "data" / "sample"
# Shipped configs whose data is in the repository: these must validate with every check on.
SELF_CONTAINED = {"sample_tiny.yaml", "expansion_code.yaml"}
# Cluster examples: world sizes they are written for (see the comment at the top of each file).
CLUSTER_WORLD = {"llama3_8b_zero3.yaml": 16, "llama3_70b_zero3.yaml": 32, "llama3_70b_zero3_offload.yaml": 8}


def _load(path: Path) -> tuple[RunConfig, tuple[str, ...]]:
    """The config validated without file checks, and the problems a full validation reports (empty if none)."""
    cfg = load_config(path, check_files=False)
    try:
        load_config(path)
    except ConfigError as exc:
        return cfg, exc.problems
    return cfg, ()


def test_the_expected_configs_are_shipped() -> None:
    names = {p.name for p in CONFIGS}
    assert names >= SELF_CONTAINED | set(CLUSTER_WORLD) | {"shared_data_smollm2.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path: Path) -> None:
    cfg, problems = _load(path)
    assert cfg.domain_names, "a shipped config must name its domains"
    if path.name in SELF_CONTAINED:
        assert problems == ()
    for problem in problems:
        assert ": file not found: " in problem, f"{path.name}: a problem other than a missing data file: {problem}"
    # The DeepSpeed config is named, and resolves to a shipped file (in the checkout or the wheel).
    assert "/" not in cfg.deepspeed.config
    assert resolve_ds_config_path(cfg.deepspeed.config).parent == shipped_path("ds_configs").resolve()


def test_sample_configs_use_the_sample_data() -> None:
    for name in SELF_CONTAINED:
        cfg = load_config(REPO / "configs" / name)
        assert cfg.domain_names == DEFAULT_DOMAIN_NAMES
        for domain in cfg.data.domains:
            assert domain.train == (str(SAMPLE / f"{domain.name}.jsonl"),)
            assert domain.raw == (str(SAMPLE / f"{domain.name}_raw.jsonl"),)
        assert cfg.model.path == str(REPO / "runs" / "tiny-model")  # what the quickstart's tiny-model command writes


def test_sample_tiny_is_short() -> None:
    cfg = load_config(REPO / "configs" / "sample_tiny.yaml")
    assert (cfg.train.max_steps, cfg.data.seq_len, cfg.train.micro_batch_size) == (60, 256, 4)
    assert (cfg.eval.every, cfg.checkpoint.every, cfg.probe.num_samples) == (15, 30, 64)
    assert cfg.mixture.target_domain is None


def test_expansion_config_targets_code() -> None:
    cfg = load_config(REPO / "configs" / "expansion_code.yaml")
    assert cfg.mixture.strategy == "versatune"
    assert cfg.mixture.target_domain == "code"
    assert 0 < cfg.mixture.target_ramp_steps <= cfg.train.max_steps


@pytest.mark.parametrize("name", sorted(CLUSTER_WORLD))
def test_cluster_configs_are_realistic(name: str) -> None:
    cfg = load_config(REPO / "configs" / name, check_files=False)
    assert cfg.model.dtype == "bf16" and cfg.export.dtype == "bf16"
    assert cfg.data.seq_len == 4096 and cfg.data.packing and cfg.model.gradient_checkpointing
    assert cfg.dist.backend == "nccl"
    assert all(source.startswith("/data/") for d in cfg.data.domains for source in (*d.train, *d.heldout, *d.raw))


def test_shared_data_config_points_at_the_bundle() -> None:
    cfg, problems = _load(REPO / "configs" / "shared_data_smollm2.yaml")
    bundle = (REPO.parent / "shared" / "data").resolve()
    for domain in cfg.data.domains:
        assert domain.train == (str(bundle / "sft" / f"{domain.name}.jsonl"),)
        assert domain.raw == (str(bundle / "raw" / f"{domain.name}.jsonl"),)
    assert cfg.model.path == str(REPO / "runs" / "smollm2")
    if (bundle / "sft").is_dir():
        assert problems == ()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ds_config_builds_for_every_shipped_config(path: Path) -> None:
    from versatune_ds.engine.ds_config import build_ds_config

    cfg = load_config(path, check_files=False)
    world = CLUSTER_WORLD.get(path.name, 2)
    ds = build_ds_config(cfg, world, cuda=path.name in CLUSTER_WORLD)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] == (path.name in CLUSTER_WORLD)


def _check_config(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "versatune_ds", "check-config", "--config", str(path), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_check_config_command_on_shipped_configs(path: Path) -> None:
    _, problems = _load(path)
    world = str(CLUSTER_WORLD.get(path.name, 1))
    result = _check_config(path, "--world-size", world)
    assert "Traceback" not in result.stdout + result.stderr
    if problems:  # data files absent here: the command must report exactly those, and nothing else
        assert result.returncode == 2, result.stderr
        assert f"{len(problems)} problem(s)" in result.stderr
        assert result.stderr.count(": file not found: ") == len(problems)
    else:
        assert result.returncode == 0, result.stderr
        assert "# run config (resolved)" in result.stdout
        assert '"train_batch_size"' in result.stdout


# ----------------------------------------------------------------------------------------------
# The sample data written by us


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("domain", DEFAULT_DOMAIN_NAMES)
def test_sample_data_is_well_formed(domain: str) -> None:
    rows = _rows(SAMPLE / f"{domain}.jsonl")
    assert len(rows) == 40
    for row in rows:
        assert set(row) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in row.values())
        assert row["instruction"].strip() and row["output"].strip()
    assert len({(r["instruction"], r["input"]) for r in rows}) == 40, "duplicate sample rows"
    raw = _rows(SAMPLE / f"{domain}_raw.jsonl")
    assert len(raw) == 15
    assert all(set(r) == {"text"} and r["text"].strip() for r in raw)


def test_sample_formats_are_well_formed() -> None:
    messages = _rows(SAMPLE / "formats" / "general_messages.jsonl")
    sharegpt = _rows(SAMPLE / "formats" / "general_sharegpt.jsonl")
    assert len(messages) == len(sharegpt) == 10
    role_of = {"system": "system", "human": "user", "gpt": "assistant"}
    for m_row, s_row in zip(messages, sharegpt):
        turns = m_row["messages"]
        assert turns[-1]["role"] == "assistant"
        assert [t["role"] for t in turns if t["role"] != "system"][0] == "user"
        # The two files hold the same conversations.
        assert [(t["role"], t["content"]) for t in turns] == [(role_of[t["from"]], t["value"]) for t in s_row["conversations"]]


def test_sample_readme_says_what_it_is() -> None:
    text = (SAMPLE / "README.md").read_text(encoding="utf-8")
    assert "Written by the versatune_ds team" in text
    assert "not benchmark data" in text
    assert "Apache-2.0" in text
