"""The probe pipeline: estimate the base model's knowledge distribution over the domains.

1. Generate (probe.generation): N generations from lone start-token prompts, split evenly over the ranks
   with equal `generate` call counts, per-prompt seeded, gathered to rank 0 and appended to
   <run_dir>/probe/generations.jsonl (resumable).
2. Classify every generation -- the TF-IDF classifier (probe.classifier) trained on the domains' texts
   (data.prepare.domain_texts) by default, its held-out accuracy and confusion matrix in
   probe/classifier_report.json; or an LLM judge (probe.judge) with texts split over the ranks and equal
   forward counts -- and estimate p with a bootstrap CI (probe.estimators); write probe/distribution.json.

`run_probe(cfg, env, ...)` is also the first stage of `train` (unless mixture.distribution is given;
`read_distribution` reads such a file).
"""

from __future__ import annotations

import gc
import json
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
from versatune_ds.data.prepare import domain_texts
from versatune_ds.data.tokenizer import load_tokenizer
from versatune_ds.dist import DistEnv
from versatune_ds.domains import Domains
from versatune_ds.engine.models import load_inference_model
from versatune_ds.errors import UserError
from versatune_ds.files import write_json_atomic
from versatune_ds.probe.classifier import DomainClassifier, TfidfDomainClassifier, evaluate_classifier, train_tfidf_classifier
from versatune_ds.probe.estimators import (
    DistributionEstimate,
    adjusted_distribution,
    estimate_distribution,
    mean_probability_confusion,
)
from versatune_ds.probe.generation import generate_all, start_token
from versatune_ds.probe.judge import LlmJudgeClassifier

logger = logging.getLogger(__name__)

PROBE_DIR = "probe"
DISTRIBUTION_FILE = "distribution.json"
CLASSIFIER_DIR = "classifier"
CLASSIFIER_REPORT_FILE = "classifier_report.json"
HELDOUT_FRACTION = 0.2  # of the classifier's texts, per domain, for its accuracy report
_SPLIT_STREAM = 11  # seed-sequence namespace for the classifier's hold-out split


# ----------------------------------------------------------------------------------------------
# Classification and the distribution


@dataclass(frozen=True)
class ProbeResult:
    p: np.ndarray  # by domain id, on every rank
    ci_low: np.ndarray
    ci_high: np.ndarray
    num_texts: int
    distribution_path: Path


def train_probe_classifier(cfg: RunConfig, domains: Domains, probe_dir: Path) -> tuple[DomainClassifier, np.ndarray | None]:
    """Rank 0: the TF-IDF classifier and its held-out mean-probability confusion M (M[i, j] = mean P(j) over
    held-out texts of domain i). Trained on data.domain_texts minus a fixed-seed per-domain hold-out whose
    accuracy, confusion and M go to classifier_report.json; or loaded from classifier.path (M then only for
    the adjusted estimator, measured on the same hold-out, which that classifier may have trained on)."""
    adjusted = cfg.classifier.estimator == "adjusted"
    if cfg.classifier.path and not adjusted:
        return TfidfDomainClassifier.load(cfg.classifier.path, domain_names=domains.names), None
    texts, labels = domain_texts(cfg.data)
    train_ids, test_ids = heldout_split(np.asarray(labels), HELDOUT_FRACTION, cfg.train.seed)
    test_texts, test_labels = [texts[i] for i in test_ids], np.asarray([labels[i] for i in test_ids], dtype=np.int64)
    if cfg.classifier.path:
        logger.warning("classifier.estimator=adjusted with a saved classifier: its confusion is measured on a "
                       "hold-out it may have trained on, so the correction may be too weak")
        classifier = TfidfDomainClassifier.load(cfg.classifier.path, domain_names=domains.names)
        return classifier, mean_probability_confusion(classifier.predict_proba(test_texts), test_labels, len(domains))
    classifier = train_tfidf_classifier(
        [texts[i] for i in train_ids], [labels[i] for i in train_ids], len(domains), seed=cfg.train.seed,
        domain_names=domains.names,
    )
    classifier.save(probe_dir / CLASSIFIER_DIR)
    report = evaluate_classifier(classifier, test_texts, test_labels)
    confusion_mean = mean_probability_confusion(classifier.predict_proba(test_texts), test_labels, len(domains))
    write_json_atomic(probe_dir / CLASSIFIER_REPORT_FILE, {
        "domains": list(domains.names), "accuracy": report.accuracy, "confusion": report.confusion,
        "mean_probability_confusion": confusion_mean.tolist(),
        "precision": list(report.precision), "recall": list(report.recall), "num_test_texts": report.num_examples,
        "num_train_texts": len(train_ids), "heldout_fraction": HELDOUT_FRACTION, "seed": cfg.train.seed,
        "note": "held out from the classifier's own training texts (train + raw sources); generations of a base "
                "model are another style of text, where accuracy is usually lower",
    })
    logger.info("probe classifier: held-out accuracy %.3f on %d texts", report.accuracy, report.num_examples)
    return classifier, confusion_mean


def heldout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, test) positions: `fraction` of each domain's texts held out, chosen by a seeded permutation."""
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    train: list[int] = []
    test: list[int] = []
    for domain_id in np.unique(labels):
        members = np.flatnonzero(labels == domain_id)
        members = members[rng.permutation(members.size)]
        cut = int(round(members.size * fraction)) if members.size > 1 else 0
        test.extend(members[:cut].tolist())
        train.extend(members[cut:].tolist())
    return sorted(train), sorted(test)


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


def read_distribution(path: str | os.PathLike[str], domains: Domains) -> np.ndarray:
    """p by domain id from a distribution.json (mixture.distribution); its domains must be this run's."""
    file = Path(path)
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
        names, p = list(document["domains"]), [float(x) for x in document["p"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"mixture.distribution: cannot read a distribution from {file}: {exc}") from None
    if sorted(names) != sorted(domains.names) or len(p) != len(names):
        raise UserError(f"mixture.distribution: {file} has domains {names}, the run has {list(domains.names)}")
    return domains.array_from_mapping(dict(zip(names, p)), key=f"mixture.distribution ({file})")


def run_probe(cfg: RunConfig, env: DistEnv, *, run_dir: str | os.PathLike[str] | None = None,
              tokenizer: PreTrainedTokenizerBase | None = None) -> ProbeResult:
    """Generate, classify, estimate p; call on every rank after the process group is up.

    The model of cfg.model is loaded as probe.mode says (a replica per rank, or ZeRO-3 partitioned).
    Returns p (and CI) on every rank; files go to <run_dir>/probe/.
    """
    if cfg.classifier.estimator == "adjusted" and cfg.classifier.kind != "tfidf":
        raise UserError("classifier.estimator=adjusted needs classifier.kind=tfidf (its held-out confusion); use mean or hard")
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
        classifier, confusion_mean = train_probe_classifier(cfg, domains, probe_dir)
        probs = classifier.predict_proba(texts)
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
