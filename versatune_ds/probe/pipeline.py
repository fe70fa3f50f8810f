"""The probe pipeline: estimate the base model's knowledge distribution over the domains.

1. Generate (probe.generation): N generations from lone start-token prompts, split evenly over the ranks
   with equal `generate` call counts, per-prompt seeded, gathered to rank 0 and appended to
   <run_dir>/probe/generations.jsonl (resumable).
2. Classify every generation -- the classifier of `classifier.kind` (probe.training: trained on the domains'
   texts, or reused or loaded; its held-out accuracy and confusion matrix in probe/classifier_report.json), or
   an LLM judge (probe.judge) with texts split over the ranks and equal forward counts -- and estimate p with a
   bootstrap CI (probe.estimators); write probe/distribution.json.

`run_probe(cfg, env, ...)` is also the first stage of `train` (unless mixture.distribution is given;
`read_distribution` reads such a file).
"""

from __future__ import annotations

import gc
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.table import Table
from transformers import PreTrainedTokenizerBase

from versatune_ds import dist
from versatune_ds.config.schema import RunConfig
from versatune_ds.data.tokenizer import load_tokenizer
from versatune_ds.dist import DistEnv
from versatune_ds.domains import Domains
from versatune_ds.engine.models import load_inference_model
from versatune_ds.errors import UserError
from versatune_ds.files import write_json_atomic
from versatune_ds.probe.distribution import DISTRIBUTION_FILE, PROBE_DIR, read_distribution  # noqa: F401 (re-exported)
from versatune_ds.probe.embedding import INSTALL_HINT, embedder_available
from versatune_ds.probe.estimators import (  # noqa: F401 (mean_probability_confusion: part of this module's API)
    DistributionEstimate,
    adjusted_distribution,
    estimate_distribution,
    mean_probability_confusion,
)
from versatune_ds.probe.generation import generate_all, start_token
from versatune_ds.probe.judge import LlmJudgeClassifier
from versatune_ds.probe.training import (  # noqa: F401 (re-exported: the probe's files and split)
    CLASSIFIER_DIR,
    CLASSIFIER_REPORT_FILE,
    EMBEDDING_KINDS,
    HELDOUT_FRACTION,
    TRAINED_KINDS,
    heldout_split,
    probe_classifier,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Classification and the distribution


@dataclass(frozen=True)
class ProbeResult:
    p: np.ndarray  # by domain id, on every rank
    ci_low: np.ndarray
    ci_high: np.ndarray
    num_texts: int
    distribution_path: Path


def judge_probabilities(cfg: RunConfig, env: DistEnv, domains: Domains, texts: list[str] | None, *, zero3: bool) -> np.ndarray | None:
    """LLM-judge probabilities, texts split across ranks with equal forward counts; the matrix on rank 0."""
    if not cfg.classifier.judge_model:
        raise UserError("classifier.kind=llm_judge needs classifier.judge_model (a local instruct model folder)")
    texts = dist.broadcast_object(texts)
    judge_cfg = cfg.model.for_folder(cfg.classifier.judge_model)
    model = load_inference_model(judge_cfg, env, zero3=zero3)
    tokenizer = load_tokenizer(judge_cfg)
    judge = LlmJudgeClassifier(model.module, tokenizer, domains.names, batch_size=cfg.probe.batch_size)
    mine = dist.shard_sequence(texts, env.world_size, env.rank)
    num_batches = judge.forward_batches(math.ceil(len(texts) / env.world_size))
    probs = judge.predict_proba(mine, num_batches=num_batches)
    parts = dist.all_gather_objects(probs)
    del model
    return np.concatenate(parts, axis=0) if env.is_main else None


def write_distribution(probe_dir: Path, domains: Domains, estimate: DistributionEstimate, extra: dict[str, object]) -> Path:
    path = probe_dir / DISTRIBUTION_FILE
    write_json_atomic(path, {
        "domains": list(domains.names), "p": list(estimate.p), "ci_low": list(estimate.ci_low),
        "ci_high": list(estimate.ci_high), "num_texts": estimate.num_texts, "estimator": estimate.mode,
        "confidence": estimate.confidence, **extra,
    })
    return path


def run_probe(cfg: RunConfig, env: DistEnv, *, run_dir: str | os.PathLike[str] | None = None,
              tokenizer: PreTrainedTokenizerBase | None = None) -> ProbeResult:
    """Generate, classify, estimate p; call on every rank after the process group is up.

    The model of cfg.model is loaded as probe.mode says (a replica per rank, or ZeRO-3 partitioned).
    Returns p (and CI) on every rank; files go to <run_dir>/probe/.
    """
    if cfg.classifier.estimator == "adjusted" and cfg.classifier.kind == "llm_judge":
        raise UserError(f"classifier.estimator=adjusted needs a trained classifier (classifier.kind={', '.join(TRAINED_KINDS)}: "
                        "its held-out confusion); use mean or hard with llm_judge")
    if cfg.classifier.kind in EMBEDDING_KINDS and not embedder_available():
        raise UserError(INSTALL_HINT)  # before the generations, not after
    domains = Domains(cfg.domain_names)
    probe_dir = Path(run_dir if run_dir is not None else cfg.train.run_dir) / PROBE_DIR
    zero3 = cfg.probe.mode == "zero3"
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    model = load_inference_model(cfg.model, env, zero3=zero3)
    generations = generate_all(cfg, env, model.module, tokenizer, probe_dir, zero3=zero3)
    del model
    gc.collect()  # a DeepSpeed engine holds reference cycles: free the probe model before training loads its own
    texts = [g["text"] for g in generations] if env.is_main else None
    confusion_mean = probs = None
    if cfg.classifier.kind == "llm_judge":
        probs = judge_probabilities(cfg, env, domains, texts, zero3=zero3)
    elif env.is_main:
        trained = probe_classifier(cfg.classifier, cfg.data, domains.names, cfg.train.seed, probe_dir,
                                   need_confusion=cfg.classifier.estimator == "adjusted")
        confusion_mean = trained.confusion_mean
        assert texts is not None  # gathered on rank 0
        probs = trained.classifier.predict_proba(texts)
    payload = None
    if env.is_main:
        assert probs is not None and texts is not None
        bootstrap, seed = cfg.classifier.num_bootstrap, cfg.train.seed
        if cfg.classifier.estimator == "adjusted":
            assert confusion_mean is not None
            estimate = adjusted_distribution(probs, confusion_mean, num_bootstrap=bootstrap, seed=seed)
        else:
            estimate = estimate_distribution(probs, mode=cfg.classifier.estimator, num_bootstrap=bootstrap, seed=seed)
        start = start_token(tokenizer)
        write_distribution(probe_dir, domains, estimate, {
            "start_token": start.text, "start_token_kind": start.kind, "classifier": cfg.classifier.kind,
            "model": cfg.model.path, "num_samples": cfg.probe.num_samples,
            "mean_generated_tokens": float(np.mean([g["num_tokens"] for g in generations])) if generations else 0.0,
            "empty_generations": sum(1 for t in texts if not t.strip()),
        })
        payload = np.concatenate([estimate.p, estimate.ci_low, estimate.ci_high, [estimate.num_texts]])
    n = len(domains)
    values = dist.broadcast_array(payload, 3 * n + 1)
    return ProbeResult(values[:n], values[n : 2 * n], values[2 * n : 3 * n], int(values[-1]), probe_dir / DISTRIBUTION_FILE)


def distribution_table(domains: Domains, result: ProbeResult) -> Table:
    table = Table(title=f"knowledge distribution ({result.num_texts} generations)")
    for column in ("domain", "p", "95% CI"):
        table.add_column(column, justify="left" if column == "domain" else "right")
    for d, name in enumerate(domains.names):
        table.add_row(name, f"{result.p[d]:.3f}", f"[{result.ci_low[d]:.3f}, {result.ci_high[d]:.3f}]")
    return table
