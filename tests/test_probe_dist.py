"""Two-rank probe and weighting runs (gloo, torchrun subprocess, short collective timeout).

The tiny model is edited so that EOS becomes likely at some positions and not others: generations then
stop at different lengths on different ranks, which is what hangs a ZeRO-3 `generate` without
synced_gpus or with unequal call counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from versatune_ds.dist import DistEnv

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
NUM_SAMPLES, BATCH, MAX_NEW = 9, 4, 12  # 2 ranks: shards 5 and 4 -> 2 calls each, rank 1 makes one dummy call

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from dataclasses import dataclass
    from pathlib import Path
    import numpy as np
    from versatune_ds import dist
    from versatune_ds.probe import generation as gen
    from versatune_ds.config.loading import load_config
    from versatune_ds.data.tokenizer import load_tokenizer
    from versatune_ds.domains import Domains
    from versatune_ds.data.packing import Row
    from versatune_ds.engine.models import load_inference_model
    from versatune_ds.mixture.build import build_weight_policy
    from versatune_ds.eval.heldout import DomainLosses

    mode, model_dir, out_dir, sample = sys.argv[1:5]
    env = dist.DistEnv.from_environ()
    dist.start_process_group(env, backend="gloo", timeout_s=60)
    cfg = load_config(None, [
        f"model.path={model_dir}", f"data.dir={sample}", "probe.num_samples=%d", "probe.batch_size=%d",
        "probe.max_new_tokens=%d", f"probe.mode={mode}", "mixture.strategy=versatune", "mixture.eta=2.0",
        *[f"mixture.reference_losses.{n}={0.5 + 0.1 * i}" for i, n in enumerate(
            ["law", "medicine", "finance", "science", "code", "general"])],
    ])
    tokenizer = load_tokenizer(cfg.model)
    loaded = load_inference_model(cfg.model, env, zero3=mode == "zero3")  # keep it alive while `model` is used
    model = loaded.module
    calls = []
    original = model.generate
    def counting_generate(*args, **kwargs):
        calls.append(int(kwargs["input_ids"].shape[0]))
        return original(*args, **kwargs)
    model.generate = counting_generate
    generations = gen.generate_all(cfg, env, model, tokenizer, Path(out_dir) / "probe", zero3=mode == "zero3")
    plan = gen.plan_generation(list(range(cfg.probe.num_samples)), env.world_size, env.rank, cfg.probe.batch_size)
    per_rank = dist.all_gather_objects({"calls": calls, "plan_calls": plan.num_calls,
                                        "prompts": sum(len(b) for b in plan.batches)})

    @dataclass
    class DomainData:
        train_rows: list
        train_examples: int
        train_tokens: int
        fingerprint: str = "x"
    @dataclass
    class Data:
        per_domain: tuple
    rows = lambda d, n: [Row(d, np.arange(n), np.arange(n), np.arange(n), (0,)) for _ in range(3)]
    data = Data(tuple(DomainData(rows(d, 10 + 5 * d), 3, 3 * (10 + 5 * d)) for d in range(6)))
    domains = Domains(cfg.domain_names)
    policy = build_weight_policy(cfg.mixture, domains, data, out_dir if env.is_main else None, env,
                                 initial_distribution=np.full(6, 1 / 6))
    weights = []
    for step, losses in enumerate([[3.0, 2.0, 2.5, 1.0, 4.0, 2.2], [2.9, 2.4, 2.0, 1.1, 3.0, 2.6]]):
        result = DomainLosses(loss=np.array(losses), loss_sum=np.array(losses), tokens=np.ones(6))
        weights.append(policy.after_eval(step, result).tobytes().hex())
    all_weights = dist.all_gather_objects(weights)
    if env.is_main:
        Path(out_dir, "result.json").write_text(json.dumps({
            "generations": generations, "per_rank": per_rank, "weights": all_weights,
            "state_weights": policy.state_dict()["weights"],
        }))
    dist.barrier()
    dist.destroy()
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)  # skip C++ teardown, where gloo can abort a finished process (see versatune_ds.cli)
    """
    % (NUM_SAMPLES, BATCH, MAX_NEW)
)


@pytest.fixture(scope="module")
def eos_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with EOS likely only where one hidden coordinate is large: varied stop lengths."""
    import torch
    from conftest import TOKENIZER_TEXTS
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from versatune_ds.tiny_model import build_tiny_model_dir

    out = build_tiny_model_dir(tmp_path_factory.mktemp("eos_model"), TOKENIZER_TEXTS, seed=1)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    eos = AutoTokenizer.from_pretrained(out).eos_token_id
    with torch.no_grad():
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[eos] = 0.0
        model.lm_head.weight[eos, 0] = 6.0  # logit of EOS = 6 * normed h_0, the others keep their random rows
    model.save_pretrained(out, safe_serialization=True)
    return out


def _run(mode: str, model_dir: Path, out: Path) -> dict:
    worker = out / "worker.py"
    out.mkdir(parents=True, exist_ok=True)
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(worker), mode, str(model_dir), str(out), str(SAMPLE)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "result.json").read_text())


def _single_rank_generations(model_dir: Path, out: Path) -> list[dict]:
    from versatune_ds.config.loading import load_config
    from versatune_ds.data.tokenizer import load_tokenizer
    from versatune_ds.engine.models import load_inference_model
    from versatune_ds.probe import generation as gen

    single = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=29500, launcher="single")
    cfg = load_config(None, [f"model.path={model_dir}", f"data.dir={SAMPLE}", f"probe.num_samples={NUM_SAMPLES}",
                             "probe.batch_size=3", f"probe.max_new_tokens={MAX_NEW}"])
    loaded = load_inference_model(cfg.model, single, zero3=False)  # keep it alive while `model` is used
    model = loaded.module
    return gen.generate_all(cfg, single, model, load_tokenizer(cfg.model), out / "probe", zero3=False)


@pytest.mark.parametrize("mode", ["replica", "zero3"])
def test_two_rank_probe(mode, eos_model_dir, tmp_path):
    result = _run(mode, eos_model_dir, tmp_path / mode)
    generations = result["generations"]
    assert [g["index"] for g in generations] == list(range(NUM_SAMPLES))  # gathered exactly N, each once
    lines = (tmp_path / mode / "probe" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == NUM_SAMPLES
    lengths = [g["num_tokens"] for g in generations]
    assert len(set(lengths)) > 1 and min(lengths) < MAX_NEW  # the prompts really stopped at different lengths
    per_rank = result["per_rank"]
    assert [r["plan_calls"] for r in per_rank] == [2, 2]
    assert [r["prompts"] for r in per_rank] == [5, 4]
    if mode == "zero3":
        # Under ZeRO-3 every rank really calls generate equally often (rank 1's second call is a dummy).
        assert [len(r["calls"]) for r in per_rank] == [2, 2]
    # Per-prompt seeding: the same texts as one rank with another batch size.
    assert generations == _single_rank_generations(eos_model_dir, tmp_path / f"{mode}_single")
    # Weighting: both ranks got bit-identical weights from rank 0's broadcast.
    rank0, rank1 = result["weights"]
    assert rank0 == rank1 and len(rank0) == 2
    assert rank0[0] != rank0[1]  # the second update changed the weights
