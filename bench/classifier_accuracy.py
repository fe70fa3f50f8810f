"""Accuracy of the TF-IDF domain classifier on the shared data bundle, across text styles.

Trains on sft/ rows (instruction + input + output) and raw/ passages of the six domains, minus a
fixed-seed held-out 20 % of each, then reports accuracy and the confusion matrix on
  (a) held-out raw/ passages,
  (b) held-out sft/ rows,
  (c) eval/ multiple-choice questions (question + choices; never trained on, a different style).
Several variants (char n-grams on/off, C) are tried; all are recorded.

    PYTHONPATH=. OMP_NUM_THREADS=2 .venv/bin/python bench/classifier_accuracy.py [--data-dir /work/shared/data]

Writes bench/results/classifier_accuracy.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from common import write_results  # noqa: E402

from versatune_ds.probe.classifier import ClassifierReport, TfidfConfig, evaluate_classifier, train_tfidf_classifier

DOMAINS = ("law", "medicine", "finance", "science", "code", "general")
HELD_OUT_FRACTION = 0.2
SEED = 0
# Every field that differs from the 2-5 char range is spelled out, so the variants keep their meaning
# when TfidfConfig's defaults change (the defaults are set to the winner of this bench).
CHAR_2_5 = {"char_ngram_min": 2, "char_ngram_max": 5}
VARIANTS = {
    "word_only_C10": TfidfConfig(use_char=False, c=10.0),
    "word+char_C1": TfidfConfig(use_char=True, c=1.0, **CHAR_2_5),
    "word+char_C10": TfidfConfig(use_char=True, c=10.0, **CHAR_2_5),
    "word+char_C30": TfidfConfig(use_char=True, c=30.0, **CHAR_2_5),
    "word+char_C30_200k": TfidfConfig(use_char=True, c=30.0, word_max_features=200_000, char_max_features=200_000, **CHAR_2_5),
    "word+char3-6_C30": TfidfConfig(use_char=True, c=30.0, char_ngram_min=3, char_ngram_max=6),
}


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def sft_text(row: dict) -> str:
    return "\n".join(part for part in (row["instruction"], row["input"], row["output"]) if part)


def eval_text(row: dict) -> str:
    return "\n".join([row["question"], *row["choices"]])


def split(items: list[str], rng: np.random.Generator) -> tuple[list[str], list[str]]:
    order = rng.permutation(len(items))
    num_held = int(round(HELD_OUT_FRACTION * len(items)))
    held = [items[i] for i in order[:num_held]]
    kept = [items[i] for i in order[num_held:]]
    return kept, held


def load_sets(data_dir: Path) -> dict[str, tuple[list[str], list[int]]]:
    rng = np.random.default_rng(SEED)
    sets: dict[str, tuple[list[str], list[int]]] = {name: ([], []) for name in ("train", "raw", "sft", "eval")}
    for domain_id, domain in enumerate(DOMAINS):
        sft = [sft_text(row) for row in read_jsonl(data_dir / "sft" / f"{domain}.jsonl")]
        raw = [row["text"] for row in read_jsonl(data_dir / "raw" / f"{domain}.jsonl")]
        questions = [eval_text(row) for row in read_jsonl(data_dir / "eval" / f"{domain}.jsonl")]
        sft_train, sft_held = split(sft, rng)
        raw_train, raw_held = split(raw, rng)
        for name, texts in (("train", sft_train + raw_train), ("raw", raw_held), ("sft", sft_held), ("eval", questions)):
            sets[name][0].extend(texts)
            sets[name][1].extend([domain_id] * len(texts))
    return sets


def report_dict(report: ClassifierReport) -> dict:
    return asdict(report)


def markdown(result: dict) -> str:
    lines = [
        "# Classifier accuracy (TF-IDF + logistic regression)",
        "",
        f"Command: `{result['command']}`  ",
        f"Data: {result['data_dir']} ; train {result['num_train']} texts (80 % of sft + raw per domain, seed {SEED}); "
        f"test: held-out raw {result['num_test']['raw']}, held-out sft {result['num_test']['sft']}, eval MCQ {result['num_test']['eval']}.  ",
        f"Machine: {result['machine']}",
        "",
        "| variant | char n-grams | C | features | train s | raw acc | sft acc | eval MCQ acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, variant in result["variants"].items():
        cfg = variant["config"]
        lines.append(
            f"| {name}{' (default)' if name == result['best'] else ''} | {cfg['use_char']} | {cfg['c']} | {variant['num_features']} | "
            f"{variant['train_time_s']:.1f} | {variant['raw']['accuracy']:.3f} | {variant['sft']['accuracy']:.3f} | {variant['eval']['accuracy']:.3f} |"
        )
    best = result["variants"][result["best"]]
    lines += [
        "",
        f"Selection: highest mean of the three accuracies -> `{result['best']}` (now the TfidfConfig default).",
        "The variants differ by about 1 point on eval and less on raw/sft: within noise for ~2,900 eval items.",
        "Train times are wall seconds on a 2-core machine shared with other jobs; the same variant varied",
        "about 2x between runs, so compare them only roughly.",
        "",
    ]
    for split_name in ("raw", "sft", "eval"):
        report = best[split_name]
        lines += [f"Confusion of `{result['best']}` on {split_name} (rows = true, cols = predicted; {', '.join(DOMAINS)}):", "", "```"]
        lines += [f"{DOMAINS[i]:>9} " + " ".join(f"{n:5d}" for n in row) + f"   recall {report['recall'][i]:.2f}" for i, row in enumerate(report["confusion"])]
        lines += ["```", ""]
    lines += [
        "Honest reading: held-out raw and sft come from the same sources as the training rows, so they",
        "measure in-style accuracy. The eval/ MCQs (MMLU, MedQA, MedMCQA, ARC) are another style and,",
        "for several domains, other topics (e.g. eval 'code' is CS theory and security, eval 'general' is",
        "MMLU miscellany, eval 'finance' is accounting/economics while finance training text is annual reports);",
        "that accuracy is the better guess of how the classifier does on free-running base-model generations,",
        "and it is much lower. The probe's p should be read with that in mind.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    missing = [f"{kind}/{domain}.jsonl" for kind in ("sft", "raw", "eval") for domain in DOMAINS if not (args.data_dir / kind / f"{domain}.jsonl").is_file()]
    if missing:
        print(f"classifier_accuracy: data bundle not found under {args.data_dir} (missing {missing[:3]}...); "
              "pass --data-dir pointing at the multi-domain data bundle", file=sys.stderr)
        return 2

    sets = load_sets(args.data_dir)
    train_texts, train_labels = sets["train"]
    result: dict = {
        "command": "PYTHONPATH=. OMP_NUM_THREADS=2 .venv/bin/python bench/classifier_accuracy.py",
        "data_dir": str(args.data_dir),
        "machine": "2 CPU cores, shared with other jobs",
        "domains": list(DOMAINS),
        "num_train": len(train_texts),
        "num_test": {name: len(sets[name][0]) for name in ("raw", "sft", "eval")},
        "variants": {},
    }
    for name, config in VARIANTS.items():
        start = time.perf_counter()
        clf = train_tfidf_classifier(train_texts, train_labels, len(DOMAINS), seed=SEED, config=config, domain_names=DOMAINS)
        train_time = time.perf_counter() - start
        variant = {"config": asdict(config), "train_time_s": round(train_time, 2), "num_features": int(clf.coef.shape[1])}
        for split_name in ("raw", "sft", "eval"):
            variant[split_name] = report_dict(evaluate_classifier(clf, *sets[split_name]))
        result["variants"][name] = variant
        print(f"{name:16s} train {train_time:6.1f}s  raw {variant['raw']['accuracy']:.3f}  "
              f"sft {variant['sft']['accuracy']:.3f}  eval {variant['eval']['accuracy']:.3f}", flush=True)
    result["best"] = max(result["variants"], key=lambda n: np.mean([result["variants"][n][s]["accuracy"] for s in ("raw", "sft", "eval")]))
    write_results("classifier_accuracy", result, markdown(result), folder=args.out_dir)
    print(f"best: {result['best']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
