"""`versatune-ds probe`: estimate the base model's knowledge distribution over the domains.

1. Generate (versatune_ds.probe_generation): N generations from lone start-token prompts, split evenly
   over the ranks with equal `generate` call counts, per-prompt seeded, gathered to rank 0 and appended
   to <run_dir>/probe/generations.jsonl (resumable).
2. Classify every generation -- the TF-IDF classifier trained on the domains' texts (data.domain_texts)
   by default, its held-out accuracy and confusion matrix in probe/classifier_report.json; or an LLM
   judge with texts split over the ranks and equal forward counts -- and estimate p with a bootstrap CI
   (classify.estimate_distribution); write probe/distribution.json and show it as a table on rank 0.

`run_probe(cfg, env, ...)` is also the first stage of `train` (unless mixture.distribution is given;
`read_distribution` reads such a file). This is a command module: torch / transformers / deepspeed are
imported inside functions only.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from versatune_ds import dist
from versatune_ds.domains import Domains
from versatune_ds.errors import UserError
from versatune_ds.probe_generation import generate_all, load_probe_model, start_token
from versatune_ds.weighting import write_json_atomic

if TYPE_CHECKING:
    import argparse

    from versatune_ds.config import RunConfig
    from versatune_ds.dist import DistEnv

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


def train_probe_classifier(cfg: RunConfig, domains: Domains, probe_dir: Path) -> tuple[Any, np.ndarray | None]:
    """Rank 0: the TF-IDF classifier and its held-out mean-probability confusion M (M[i, j] = mean P(j) over
    held-out texts of domain i). Trained on data.domain_texts minus a fixed-seed per-domain hold-out whose
    accuracy, confusion and M go to classifier_report.json; or loaded from classifier.path (M then only for
    the adjusted estimator, measured on the same hold-out, which that classifier may have trained on)."""
    from versatune_ds.classify import TfidfDomainClassifier, evaluate_classifier, train_tfidf_classifier
    from versatune_ds.data import domain_texts

    adjusted = cfg.classifier.estimator == "adjusted"
    if cfg.classifier.path and not adjusted:
        return TfidfDomainClassifier.load(cfg.classifier.path, domain_names=domains.names), None
    texts, labels = domain_texts(cfg)
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


def mean_probability_confusion(probs: np.ndarray, labels: np.ndarray, num_domains: int) -> np.ndarray:
    """M[i, j] = mean predicted probability of domain j over texts of domain i (identity row where i has none)."""
    matrix = np.eye(num_domains)
    for domain_id in range(num_domains):
        rows = probs[labels == domain_id]
        if len(rows):
            matrix[domain_id] = rows.mean(axis=0)
    return matrix


def adjusted_distribution(probs: np.ndarray, confusion_mean: np.ndarray, *, num_bootstrap: int, seed: int,
                          confidence: float = 0.95) -> Any:
    """"Adjusted classify and count" (Forman 2008, for probabilities): the measured mean q = M^T p, so solve
    for p >= 0 by NNLS and renormalise. It undoes the classifier's systematic spread of probability mass (a
    text of domain i gets some mass on every j), which pulls the plain mean toward uniform. The CI comes from
    the same percentile bootstrap over texts as classify.estimate_distribution, solving once per resample."""
    from scipy.optimize import nnls

    from versatune_ds.classify import DistributionEstimate

    def solve(measured: np.ndarray) -> np.ndarray:
        solution, _ = nnls(confusion_mean.T, measured)
        return solution / solution.sum() if solution.sum() > 0 else measured

    num_texts = probs.shape[0]
    p = solve(probs.mean(axis=0))
    low, high = p, p
    if num_bootstrap > 0:
        rng = np.random.default_rng(seed)
        counts = rng.multinomial(num_texts, np.full(num_texts, 1.0 / num_texts), size=num_bootstrap)
        stats = np.stack([solve(row) for row in counts @ probs / num_texts])
        tail = (1.0 - confidence) / 2.0
        low, high = np.quantile(stats, [tail, 1.0 - tail], axis=0)
    return DistributionEstimate(p=tuple(map(float, p)), ci_low=tuple(map(float, low)), ci_high=tuple(map(float, high)),
                                num_texts=num_texts, mode="adjusted", confidence=confidence)


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
    from versatune_ds.data import load_tokenizer
    from versatune_ds.judge import LlmJudgeClassifier

    if not cfg.classifier.judge_model:
        raise UserError("classifier.kind=llm_judge needs classifier.judge_model (a local instruct model folder)")
    texts = dist.broadcast_object(texts)
    model, keep = load_probe_model(cfg, env, cfg.classifier.judge_model, zero3=zero3)
    tokenizer = load_tokenizer(_with_model(cfg, cfg.classifier.judge_model))
    judge = LlmJudgeClassifier(model, tokenizer, domains.names, batch_size=cfg.probe.batch_size)
    mine = dist.shard_sequence(texts, env.world_size, env.rank)
    num_batches = judge.forward_batches(math.ceil(len(texts) / env.world_size))
    probs = judge.predict_proba(mine, num_batches=num_batches)
    parts = dist.all_gather_objects(probs)
    del keep
    return np.concatenate(parts, axis=0) if env.is_main else None


def _with_model(cfg: RunConfig, path: str) -> RunConfig:
    import dataclasses

    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=path, tokenizer=None, gguf_file=None))


def write_distribution(probe_dir: Path, domains: Domains, estimate: Any, extra: dict) -> Path:
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
              model: Any = None, tokenizer: Any = None) -> ProbeResult:
    """Generate, classify, estimate p; call on every rank after the process group is up.

    model / tokenizer: reuse an already loaded model (e.g. the training engine's module; under ZeRO-3
    pass the partitioned module and set probe.mode=zero3). Otherwise the model of cfg.model is loaded
    as probe.mode says. Returns p (and CI) on every rank; files go to <run_dir>/probe/.
    """
    from versatune_ds.classify import estimate_distribution
    from versatune_ds.data import load_tokenizer

    if cfg.classifier.estimator == "adjusted" and cfg.classifier.kind != "tfidf":
        raise UserError("classifier.estimator=adjusted needs classifier.kind=tfidf (its held-out confusion); use mean or hard")
    domains = Domains(cfg.domain_names)
    probe_dir = Path(run_dir if run_dir is not None else cfg.train.run_dir) / PROBE_DIR
    zero3 = cfg.probe.mode == "zero3"
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    keep = None
    if model is None:
        model, keep = load_probe_model(cfg, env, cfg.model.path, zero3=zero3)
    generations = generate_all(cfg, env, model, tokenizer, probe_dir, zero3=zero3)
    del model, keep
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


def distribution_table(domains: Domains, result: ProbeResult) -> Any:
    from rich.table import Table

    table = Table(title=f"knowledge distribution ({result.num_texts} generations)")
    for column in ("domain", "p", "95% CI"):
        table.add_column(column, justify="left" if column == "domain" else "right")
    for d, name in enumerate(domains.names):
        table.add_row(name, f"{result.p[d]:.3f}", f"[{result.ci_low[d]:.3f}, {result.ci_high[d]:.3f}]")
    return table


# ----------------------------------------------------------------------------------------------
# Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--run-dir", default=None, help="output folder (default: train.run_dir)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. probe.num_samples=64")


def run_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from versatune_ds.config import load_config

    cfg = load_config(args.config, args.overrides)
    env = dist.DistEnv.from_environ(default_port=cfg.dist.master_port)
    dist.init_distributed(env, backend=cfg.dist.backend, timeout_s=cfg.dist.timeout_s)
    try:
        result = run_probe(cfg, env, run_dir=args.run_dir)
        if env.is_main:
            Console().print(distribution_table(Domains(cfg.domain_names), result))
            logger.info("wrote %s", result.distribution_path)
        dist.barrier()
    finally:
        dist.destroy()
    return 0
