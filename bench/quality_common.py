"""Shared pieces of the controlled-base quality benchmarks (bench/quality_tiny.py, bench/expansion.py).

A benchmark here drives the real CLI (`versatune-ds probe | eval | train`) in subprocesses and reads the
run directories afterwards. Public API (kept small so another benchmark can import it):

    DOMAINS, DATA, REPO, OUT, RESULTS                 names / paths (DATA honours VERSATUNE_SHARED_DATA)
    BaseSettings(...)                                 frozen settings of the controlled base model
    ensure_base(work, settings) -> BaseSetup          pretrain the tiny base on the known skewed mixture (cached)
    write_run_config(path, base, **sections) -> Path  a run config YAML over the base's SFT train / held-out files
    Job, run_jobs, machine_info, versions, read_jsonl   from bench/common.py (re-exported)
    eval_losses(run_dir) -> {step: np.ndarray}        per-domain held-out loss by step (metrics.jsonl)
    trained_tokens(run_dir) -> np.ndarray             tokens trained per domain (metrics.jsonl)
    weight_trajectory(run_dir) -> (steps, weights)    share weights over time (mixture.json)
    mean_std(values) -> (mean, std)                   over seeds (std with ddof=1; 0 for one value)

The base model: a tiny Llama whose BPE tokenizer is trained on all raw + sft text (vocabulary only), then
pretrained from scratch by the loop in bench/probe_fidelity.py ( `pretrain`, imported unchanged) on
BOS + document + EOS, documents drawn per domain with probe_fidelity.TRUTH (law 40 %, medicine 20 %,
finance 15 %, science 10 %, code 10 %, general 5 %). A domain's documents are its raw/ passages plus
its sft/ rows that are neither SFT training rows nor held-out rows, rendered like the `simple` template
(`### Instruction:` / `### Response:`), so the base knows the SFT format in proportion to the truth.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml
from common import CLI, DATA, OUT, REPO, RESULTS, Job, machine_info, read_jsonl, run_jobs, versions  # noqa: F401 (re-exported)

DOMAINS: tuple[str, ...] = ("law", "medicine", "finance", "science", "code", "general")  # = DEFAULT_DOMAIN_NAMES

logger = logging.getLogger("quality_common")


@dataclass(frozen=True)
class BaseSettings:
    seed: int = 0
    vocab: int = 2048
    hidden: int = 128
    layers: int = 2
    pretrain_seq_len: int = 256
    pretrain_batch_size: int = 16
    pretrain_lr: float = 3e-3
    pretrain_seconds: float = 300.0  # a cap; on an idle 2-core machine max_steps ends it first
    pretrain_max_steps: int = 400
    sft_seq_len: int = 256  # rows that fit (template + BOS/EOS) are eligible for SFT train / held-out
    heldout_per_domain: int = 40
    sft_train_per_domain: int = 600


@dataclass(frozen=True)
class BaseSetup:
    work: Path
    model_dir: Path
    train_files: dict[str, str]
    heldout_files: dict[str, str]
    raw_files: dict[str, str]
    info: dict = field(default_factory=dict)  # truth, pretraining stats, split sizes


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def render_simple(row: dict) -> str:
    """An alpaca row as the `simple` template renders it, without BOS/EOS (the pretraining loop adds them)."""
    user = f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]
    return f"### Instruction:\n{user}\n\n### Response:\n{row['output']}"


def ensure_base(work: Path, settings: BaseSettings) -> BaseSetup:
    """Build (or reuse, when work/base.json matches `settings`) the controlled base model and the data splits."""
    marker = work / "base.json"
    key = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:16]
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("key") == key and (work / "model" / "model.safetensors").is_file():
            logger.info("reusing the base model in %s", work)
            return BaseSetup(work, work / "model", saved["train_files"], saved["heldout_files"], saved["raw_files"], saved["info"])
    if not (DATA / "sft").is_dir():
        raise SystemExit(f"the data bundle is not at {DATA} (set VERSATUNE_SHARED_DATA)")
    sys.path.insert(0, str(REPO / "bench"))
    import probe_fidelity  # the pretraining loop and truth mixture, reused unchanged
    from transformers import AutoTokenizer

    from versatune_ds.tiny_model import build_tiny_model_dir

    started = time.perf_counter()
    raw = {d: [r["text"] for r in read_jsonl(DATA / "raw" / f"{d}.jsonl") if r["text"].strip()] for d in DOMAINS}
    sft = {d: read_jsonl(DATA / "sft" / f"{d}.jsonl") for d in DOMAINS}
    vocab_texts = [t for d in DOMAINS for t in raw[d]] + [render_simple(r) for d in DOMAINS for r in sft[d]]
    model_dir = build_tiny_model_dir(
        work / "model", vocab_texts, vocab_size=settings.vocab, hidden_size=settings.hidden,
        num_layers=settings.layers, num_heads=4, seed=settings.seed, chat_template=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = np.random.default_rng([settings.seed, 7])
    train_files, heldout_files, raw_files, docs, split_info = {}, {}, {}, [], {}
    for d in DOMAINS:
        rows = sft[d]
        # +3: BOS, EOS and a margin for the template's token boundaries.
        lengths = np.array([len(tokenizer.encode(render_simple(r), add_special_tokens=False)) + 3 for r in rows])
        fits = np.flatnonzero(lengths <= settings.sft_seq_len)
        fits = fits[rng.permutation(fits.size)]
        heldout = fits[: settings.heldout_per_domain]
        train = fits[settings.heldout_per_domain : settings.heldout_per_domain + settings.sft_train_per_domain]
        used = set(heldout.tolist()) | set(train.tolist())
        pretrain_rows = [r for i, r in enumerate(rows) if i not in used]
        train_files[d] = str(work / "data" / "sft_train" / f"{d}.jsonl")
        heldout_files[d] = str(work / "data" / "heldout" / f"{d}.jsonl")
        raw_files[d] = str(DATA / "raw" / f"{d}.jsonl")
        write_jsonl(Path(train_files[d]), [rows[i] for i in sorted(train)])
        write_jsonl(Path(heldout_files[d]), [rows[i] for i in sorted(heldout)])
        docs.append(raw[d] + [render_simple(r) for r in pretrain_rows])
        split_info[d] = {"sft_rows": len(rows), "fit_seq_len": int(fits.size), "heldout": int(heldout.size),
                         "sft_train": int(train.size), "pretrain_sft_rows": len(pretrain_rows), "pretrain_raw": len(raw[d])}
    args = argparse.Namespace(
        device="cpu", seq_len=settings.pretrain_seq_len, lr=settings.pretrain_lr, seed=settings.seed,
        max_steps=settings.pretrain_max_steps, train_seconds=settings.pretrain_seconds, batch_size=settings.pretrain_batch_size,
    )
    training = probe_fidelity.pretrain(model_dir, docs, args)
    info = {
        "truth": dict(zip(DOMAINS, probe_fidelity.TRUTH.tolist())),
        "pretraining": training,
        "settings": asdict(settings),
        "split": split_info,
        "seconds": time.perf_counter() - started,
        "tokenizer_note": "BPE vocabulary trained on all raw + sft text (vocabulary only; no weights see held-out rows)",
    }
    marker.write_text(json.dumps({"key": key, "train_files": train_files, "heldout_files": heldout_files,
                                  "raw_files": raw_files, "info": info}, indent=2))
    return BaseSetup(work, model_dir, train_files, heldout_files, raw_files, info)


def write_run_config(path: Path, base: BaseSetup, **sections: dict) -> Path:
    """A run config over the base's splits; `sections` (model=..., mixture=..., train=...) are merged on top."""
    config: dict = {
        "model": {"path": str(base.model_dir), "dtype": "fp32"},
        "data": {
            "domains": [{"name": d, "train": [base.train_files[d]], "heldout": [base.heldout_files[d]], "raw": [base.raw_files[d]]}
                        for d in DOMAINS],
            "seq_len": base.info["settings"]["sft_seq_len"],
            "packing": True,
            "template": "simple",
            "truncation": "skip",  # a safety net: rows were chosen to fit, so nothing should be skipped
            "cache_dir": str(OUT / "cache"),
        },
        "deepspeed": {"config": "zero3"},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").split("\n") if line.strip()]


def eval_losses(run_dir: Path) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for record in read_metrics(run_dir):
        if f"eval/{DOMAINS[0]}/loss" in record:
            out[int(record["step"])] = np.array([record[f"eval/{d}/loss"] for d in DOMAINS], dtype=np.float64)
    return out


def trained_tokens(run_dir: Path) -> np.ndarray:
    total = np.zeros(len(DOMAINS))
    for record in read_metrics(run_dir):
        if f"train/domain_tokens/{DOMAINS[0]}" in record:
            total += [record[f"train/domain_tokens/{d}"] for d in DOMAINS]
    return total


def weight_trajectory(run_dir: Path) -> tuple[list[int], np.ndarray]:
    """Share weights: step 0 = initial, then each update's new weights (mixture.json)."""
    doc = json.loads((Path(run_dir) / "mixture.json").read_text())
    steps = [0]
    weights = [[doc["initial_weights"][d] for d in DOMAINS]]
    for update in doc.get("updates", []):
        steps.append(int(update["step"]))
        weights.append([update["new_weights"][d] for d in DOMAINS])
    return steps, np.array(weights)


def mean_std(values: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    array = np.asarray(values, dtype=np.float64)
    std = array.std(axis=0, ddof=1) if array.shape[0] > 1 else np.zeros(array.shape[1:])
    return array.mean(axis=0), std


def ensure_probe(base: BaseSetup, *, num_samples: int, max_new_tokens: int, seed: int = 42) -> dict:
    """Run `versatune-ds probe` on the base once (cached in work/probe_run); p, CI and L1 vs the truth."""
    run_dir = base.work / "probe_run"
    distribution = run_dir / "probe" / "distribution.json"
    config = write_run_config(
        base.work / "configs" / "probe.yaml", base, train={"run_dir": str(run_dir), "seed": seed},
        probe={"num_samples": num_samples, "max_new_tokens": max_new_tokens, "batch_size": 50},
        classifier={"num_bootstrap": 1000}, dist={"master_port": 29690},
    )
    seconds = None
    if not distribution.is_file():
        seconds = run_jobs([Job("probe", ("probe", "--config", str(config), "--run-dir", str(run_dir)),
                                base.work / "logs" / "probe.log", threads=2)], 1)["probe"]
        (run_dir / "seconds.json").write_text(json.dumps({"seconds": seconds}))
    seconds = json.loads((run_dir / "seconds.json").read_text())["seconds"] if (run_dir / "seconds.json").is_file() else seconds
    doc = json.loads(distribution.read_text())
    p = np.array([doc["p"][doc["domains"].index(d)] for d in DOMAINS])
    low = np.array([doc["ci_low"][doc["domains"].index(d)] for d in DOMAINS])
    high = np.array([doc["ci_high"][doc["domains"].index(d)] for d in DOMAINS])
    truth = np.array([base.info["truth"][d] for d in DOMAINS])
    report = json.loads((run_dir / "probe" / "classifier_report.json").read_text())
    return {
        "distribution_path": str(distribution), "p": dict(zip(DOMAINS, p.tolist())),
        "ci_low": dict(zip(DOMAINS, low.tolist())), "ci_high": dict(zip(DOMAINS, high.tolist())),
        "truth": dict(zip(DOMAINS, truth.tolist())), "l1_vs_truth": float(np.abs(p - truth).sum()),
        "truth_inside_ci": int(np.sum((truth >= low) & (truth <= high))), "num_samples": num_samples,
        "max_new_tokens": max_new_tokens, "mean_generated_tokens": doc.get("mean_generated_tokens"),
        "classifier_heldout_accuracy": report["accuracy"], "seconds": seconds,
    }


def ensure_base_eval(base: BaseSetup) -> dict:
    """`versatune-ds eval --model <base> --config ...` on the held-out files (cached): the 'before' losses."""
    out = base.work / "base_eval.json"
    config = write_run_config(base.work / "configs" / "eval.yaml", base, dist={"master_port": 29691}, eval={"micro_batch_size": 20})
    seconds = None
    if not out.is_file():
        seconds = run_jobs([Job("base_eval", ("eval", "--model", str(base.model_dir), "--config", str(config), "--out", str(out)),
                                base.work / "logs" / "base_eval.log", threads=2)], 1)["base_eval"]
        (base.work / "base_eval_seconds.json").write_text(json.dumps({"seconds": seconds}))
    if seconds is None and (base.work / "base_eval_seconds.json").is_file():
        seconds = json.loads((base.work / "base_eval_seconds.json").read_text())["seconds"]
    doc = json.loads(out.read_text())
    losses = np.array([doc["domains"][d]["loss"] for d in DOMAINS])
    return {"losses": losses, "tokens": {d: doc["domains"][d]["tokens"] for d in DOMAINS}, "seconds": seconds}


def record_sft_wall(work: Path, jobs: Sequence[Job], job_seconds: dict[str, float], seconds: float, parallel: int) -> dict:
    """Persist the wall time of the SFT runs (a later invocation that reuses finished runs reports it too)."""
    path = work / "sft_wall.json"
    if jobs:
        previous = json.loads(path.read_text()) if path.is_file() else {"seconds": 0.0, "jobs": {}}
        record = {"seconds": previous["seconds"] + seconds, "jobs": {**previous["jobs"], **job_seconds}, "parallel": parallel}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))
    return json.loads(path.read_text()) if path.is_file() else {"seconds": 0.0, "jobs": {}, "parallel": parallel}
