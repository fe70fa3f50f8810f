"""Two gloo ranks (torchrun, CPU) give the same held-out losses and MCQ scores as one process.

Domains and item lists have uneven sizes, so one rank needs dummy rows; the worker counts forward
passes to show both ranks ran the same number. Run as replicas and under ZeRO-3 (partitioned weights).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from versatune_ds import dist
    from versatune_ds.eval.heldout import evaluate_domain_losses, hf_forward
    from versatune_ds.eval.mcq import McqItem, score_mcq
    from versatune_ds.data.packing import Example

    model_dir, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
    env = dist.DistEnv.from_environ()
    dist.start_process_group(env, backend="gloo", timeout_s=60)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = ["The court held that the clause was void.", "The patient had a fever.", "def f(x):\\n    return x * 2",
             "Revenue rose 12 percent.", "Light energy becomes chemical energy.", "Write a poem about the sea."]
    sizes = [3, 0, 5, 1]  # uneven: ranks get 5 and 4 rows
    heldout = []
    for d, n in enumerate(sizes):
        examples = []
        for i in range(n):
            ids = np.array(tokenizer(texts[(d + i) % 6] * (1 + i % 2), add_special_tokens=False)["input_ids"])
            labels = ids.copy(); labels[: len(ids) // 3] = -100
            examples.append(Example(i, d, ids, labels))
        heldout.append(examples)
    items = [McqItem(k % 2, k // 2, f"Question {k}: what did the court hold?", tuple(t[: 10 + 3 * j] for j, t in enumerate(texts[k % 3 : k % 3 + 4])), k % 4) for k in range(5)]
    keep = None
    if mode == "zero3":
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig
        ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
        keep = HfDeepSpeedConfig(ds)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        engine, *_ = deepspeed.initialize(model=model, config=ds)
        model = engine.module
        partitioned = all(p.numel() == 0 for p in model.parameters()) if env.world_size > 1 else None
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        partitioned = None
    model.eval()
    calls = []
    forward = hf_forward(model, torch.device("cpu"))
    def counting(batch):
        calls.append(int(batch["input_ids"].shape[0]))
        return forward(batch)
    losses = evaluate_domain_losses(counting, heldout, micro_batch_size=2, pad_token_id=tokenizer.pad_token_id, env=env)
    loss_calls = len(calls)
    model.register_forward_pre_hook(lambda module, args: calls.append(0))
    scores = score_mcq(model, items, tokenizer, batch_size=3, pad_token_id=tokenizer.pad_token_id, env=env, device=torch.device("cpu"))
    result = {
        "loss": [None if np.isnan(v) else float(v) for v in losses.loss],
        "tokens": losses.tokens.tolist(),
        "logprobs": [list(s.logprobs) for s in scores],
        "keys": [[s.domain_id, s.index] for s in scores],
        "loss_calls": loss_calls,
        "mcq_calls": len(calls) - loss_calls,
        "partitioned": partitioned,
    }
    with open(f"{out}.rank{env.rank}.json", "w") as handle:
        json.dump(result, handle)
    dist.destroy()
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)  # skip C++ teardown, where gloo can abort a finished process (see versatune_ds.cli)
    """
)


def run_worker(tmp_path: Path, model_dir: Path, mode: str, nproc: int) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"{mode}_{nproc}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    if nproc == 1:
        cmd = [sys.executable, str(script), str(model_dir), mode, str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script), str(model_dir), mode, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(nproc)]


def assert_same(single: dict, multi: list[dict]) -> None:
    for rank_result in multi:
        assert rank_result["tokens"] == single["tokens"]
        assert rank_result["keys"] == single["keys"]
        for a, b in zip(rank_result["loss"], single["loss"]):
            assert (a is None and b is None) or abs(a - b) < 1e-5
        np.testing.assert_allclose(rank_result["logprobs"], single["logprobs"], atol=1e-5)
    # Lockstep: both ranks ran the same number of forward passes (rank 1 filled with dummy rows).
    assert len({r["loss_calls"] for r in multi}) == 1 and multi[0]["loss_calls"] == 3  # ceil(5 rows / 2)
    # MCQ: one item per batch (4 choices > batch 3), 3 items on rank 0 -> 3 batches of 2 passes; rank 1 adds a filler
    assert len({r["mcq_calls"] for r in multi}) == 1 and multi[0]["mcq_calls"] == 6


@pytest.mark.timeout(300)
def test_two_replicas_equal_one_process(tmp_path, tiny_model_dir):
    [single] = run_worker(tmp_path, tiny_model_dir, "replica", 1)
    assert single["tokens"][1] == 0 and single["loss"][1] is None
    assert_same(single, run_worker(tmp_path, tiny_model_dir, "replica", 2))


@pytest.mark.timeout(300)
def test_zero3_two_ranks_equal_one_process(tmp_path, tiny_model_dir):
    [single] = run_worker(tmp_path, tiny_model_dir, "replica", 1)
    multi = run_worker(tmp_path, tiny_model_dir, "zero3", 2)
    assert all(r["partitioned"] for r in multi), "ZeRO-3 did not partition the weights"
    assert_same(single, multi)
