"""GPU tier: the CUDA paths (NCCL, bf16, the attention switch, synced generation) on a real GPU.

Every test here skips without CUDA, so the tier is safe to select anywhere (`bash tests/run gpu`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

REPO = Path(__file__).resolve().parents[1]


def _gpu_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.pop("DS_ACCELERATOR", None)  # let DeepSpeed pick CUDA
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return env


def _write_config(path: Path, model_dir: Path, run_dir: Path, **train: object) -> Path:
    sample = REPO / "data" / "sample"
    config = {
        "model": {"path": str(model_dir), "dtype": "auto", "attn_implementation": "auto"},
        "data": {
            "dir": str(sample),
            "domains": [{"name": n} for n in ("law", "medicine", "finance", "science", "code", "general")],
            "seq_len": 256,
            "heldout_fraction": 0.1,
            "cache_dir": str(run_dir.parent / "cache"),
        },
        "mixture": {"strategy": "uniform", "block_size": 64},
        "train": {"run_dir": str(run_dir), "max_steps": 30, "micro_batch_size": 4, "learning_rate": 1e-3,
                  "warmup_steps": 2, "log_every": 1, **train},
        "eval": {"every": 15, "micro_batch_size": 8},
        "checkpoint": {"every": 15, "keep_last": 1},
        "deepspeed": {"config": str(REPO / "ds_configs" / "zero3.json")},
        "dist": {"timeout_s": 120},
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_auto_attention_and_dtype_pick_the_gpu_paths() -> None:
    from transformers.utils import is_flash_attn_2_available

    from versatune_ds.engine.models import resolve_attn_implementation, torch_dtype

    expected = "flash_attention_2" if is_flash_attn_2_available() else "sdpa"
    assert resolve_attn_implementation("auto") == expected
    assert torch_dtype("auto") == torch.bfloat16


def test_packed_rows_match_examples_alone_on_gpu(tiny_model_dir: Path) -> None:
    """The packing equivalence of tests/test_packing.py, on CUDA kernels (sdpa), in fp32 and bf16."""
    from transformers import AutoModelForCausalLM

    from versatune_ds.data.packing import Example, collate_rows, pack_examples

    rng = np.random.default_rng(0)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa", dtype=dtype).cuda().eval()
        vocab = model.config.vocab_size
        examples = []
        for i, n in enumerate([13, 5, 21, 9]):
            ids = rng.integers(10, vocab, size=n).astype(np.int64)
            examples.append(Example(index=i, domain_id=0, input_ids=ids, labels=ids.copy()))
        (row,) = pack_examples(examples, seq_len=64)
        batch = collate_rows([row], pad_token_id=0, packed=True, pad_to=64)
        with torch.no_grad():
            packed = model(input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(), use_cache=False).logits[0]
            offset = 0
            for i in row.example_indices:
                ids = torch.from_numpy(examples[i].input_ids)[None].cuda()
                alone = model(input_ids=ids, use_cache=False).logits[0]
                n = ids.shape[1]
                torch.testing.assert_close(packed[offset : offset + n].float(), alone.float(), rtol=tol, atol=tol)
                offset += n


def test_padding_free_batch_matches_padded_rows_on_gpu(tiny_model_dir: Path) -> None:
    """Padding-free batches (collate_flat) on CUDA: sdpa_documents, and flash-attention 2 where it is installed."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import is_flash_attn_2_available

    from versatune_ds.data.packing import Example, collate_flat, collate_rows, pack_examples
    from versatune_ds.engine.document_attention import use_document_attention

    rng = np.random.default_rng(1)
    implementations = ["sdpa"] + (["flash_attention_2"] if is_flash_attn_2_available() else [])
    for attn in implementations:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa", dtype=torch.bfloat16).cuda().eval()
        vocab = model.config.vocab_size
        examples = []
        for i, n in enumerate([13, 5, 21, 9, 30, 17]):
            ids = rng.integers(10, vocab, size=n).astype(np.int64)
            examples.append(Example(index=i, domain_id=0, input_ids=ids, labels=ids.copy()))
        rows = pack_examples(examples, seq_len=40)
        padded = collate_rows(rows, pad_token_id=0, packed=True)
        with torch.no_grad():
            logits = model(input_ids=padded["input_ids"].cuda(), position_ids=padded["position_ids"].cuda(), use_cache=False).logits
        expected = torch.cat([logits[b, : r.num_tokens] for b, r in enumerate(rows)]).float()
        if attn == "sdpa":
            assert use_document_attention(model)
        else:
            model.set_attn_implementation(attn)
        flat = collate_flat(rows)
        with torch.no_grad():
            got = model(input_ids=flat["input_ids"].cuda(), position_ids=flat["position_ids"].cuda(), use_cache=False).logits[0].float()
        torch.testing.assert_close(got, expected, rtol=5e-2, atol=5e-2, msg=attn)


def test_zero3_bf16_train_on_one_gpu_then_export_reloads(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`versatune-ds train` on CUDA: NCCL, bf16 by default, ZeRO-3; the loss falls and the export reloads."""
    run_dir = tmp_path / "run"
    config = _write_config(tmp_path / "gpu.yaml", tiny_model_dir, run_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "versatune_ds", "train", "--config", str(config)],
        cwd=REPO, env=_gpu_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = _losses(run_dir)
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["model"]["dtype"] == "auto"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32).cuda().eval()
    saved_dtype = json.loads((run_dir / "final" / "config.json").read_text()).get("dtype")
    assert saved_dtype in ("bfloat16", None), saved_dtype  # exported in the training dtype
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 12]], device="cuda")).logits
    assert torch.isfinite(logits).all()


def test_probe_generates_on_gpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "probe_run"
    config = _write_config(tmp_path / "probe.yaml", tiny_model_dir, run_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "versatune_ds", "probe", "--config", str(config), "probe.num_samples=32",
         "probe.max_new_tokens=16", "probe.batch_size=16", "classifier.num_bootstrap=50"],
        cwd=REPO, env=_gpu_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    generations = (run_dir / "probe" / "generations.jsonl").read_text().splitlines()
    assert len(generations) == 32
    distribution = json.loads((run_dir / "probe" / "distribution.json").read_text())
    assert abs(sum(distribution["p"]) - 1) < 1e-6
