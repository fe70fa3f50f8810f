"""Shared pieces of the controlled-base quality benchmarks (bench/quality_tiny.py, bench/expansion.py, bench/tiny_base.py).

A benchmark here drives the real CLI (`versatune-ds probe | train`) in subprocesses, reads the run directories
afterwards and scores models per item with bench/domain_eval.py. Public API:

    DOMAINS, DATA, REPO, OUT, RESULTS                 names / paths (DATA honours VERSATUNE_SHARED_DATA)
    BaseSettings(...)                                 frozen settings of the controlled base (model, splits, pretraining)
    ensure_base(work, settings) -> BaseSetup          data splits + the base pretrained to its plateau (cached, resumable)
    open_base(work) -> BaseSetup                      the base finished in `work` whatever its settings, else ensure_base
    ensure_base_eval(base) -> dict                    the base scored per item on the four held-out sets (cached)
    evaluate_run(base, run_dir) -> dict               a finished run: final model + every kept checkpoint, per item (cached)
    write_run_config(path, base, **sections) -> Path  a run config YAML over the base's SFT train / validation files
    train_job(work, base, name, sections) -> Job|None the train job of a run, None when a finished identical run is there
    Job, run_jobs, machine_info, versions, read_jsonl   from bench/common.py (re-exported)
    eval_losses(run_dir) -> {step: np.ndarray}        per-domain in-loop validation loss by step (metrics.jsonl)
    trained_tokens(run_dir) -> np.ndarray             tokens trained per domain (metrics.jsonl)
    weight_trajectory(run_dir) -> (steps, weights)    share weights over time (mixture.json)
    mean_std(values) -> (mean, std)                   over seeds (std with ddof=1; 0 for one value)

**Splits** (per domain, fixed by `BaseSettings.seed`; no row is in two of them):
- raw/ passages: `raw_val` (the pretraining's plateau rule; choosing a mixture), `raw_test` (reported), the rest
  is pretraining text;
- sft/ rows that fit `sft_seq_len`: `sft_val` (the training loop's held-out set: what VersaTune's dynamic rule
  reads, and what a tuned mixture is chosen on), `sft_test` (reported; nothing reads it during training),
  `sft_train` (SFT); every other sft/ row is pretraining text, rendered like the `simple` template
  (`### Instruction:` / `### Response:`), so the base knows the SFT format in proportion to its domain's share.

**The base**: a small Llama whose BPE tokenizer is trained on all raw + sft text (vocabulary only), pretrained
from scratch by bench/base_pretrain.py on BOS + document + EOS, documents drawn per domain with the known
skew probe_fidelity.TRUTH (law 40 %, medicine 20 %, finance 15 %, science 10 %, code 10 %, general 5 %), until
every domain's raw_val loss is within 5 % of its plateau (the rule is documented there), then a short decay.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml
from base_pretrain import PretrainSettings
from common import CLI, DATA, OUT, REPO, RESULTS, Job, machine_info, read_jsonl, run_jobs, versions  # noqa: F401 (re-exported)

DOMAINS: tuple[str, ...] = ("law", "medicine", "finance", "science", "code", "general")  # = DEFAULT_DOMAIN_NAMES
EVAL_SETS: tuple[str, ...] = ("raw_val", "raw_test", "sft_val", "sft_test")

logger = logging.getLogger("quality_common")


@dataclass(frozen=True)
class BaseSettings:
    seed: int = 0
    vocab: int = 2048
    hidden: int = 160
    layers: int = 3
    heads: int = 4
    sft_seq_len: int = 256  # rows that fit (template + BOS/EOS) are eligible for the SFT splits
    sft_val_per_domain: int = 40
    sft_test_per_domain: int = 100
    sft_train_per_domain: int = 600
    raw_val_per_domain: int = 60
    raw_test_per_domain: int = 100
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)


@dataclass(frozen=True)
class BaseSetup:
    work: Path
    model_dir: Path
    files: dict[str, dict[str, str]]  # split name (sft_train, sft_val, sft_test, raw_val, raw_test) -> domain -> file
    info: dict = field(default_factory=dict)  # truth, settings, split sizes, pretraining record

    @property
    def train_files(self) -> dict[str, str]:
        return self.files["sft_train"]

    @property
    def heldout_files(self) -> dict[str, str]:
        return self.files["sft_val"]


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def render_simple(row: dict) -> str:
    """An alpaca row as the `simple` template renders it, without BOS/EOS (the pretraining loop adds them)."""
    user = f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]
    return f"### Instruction:\n{user}\n\n### Response:\n{row['output']}"


def settings_key(settings: BaseSettings) -> str:
    return hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:16]


def _split(settings: BaseSettings, work: Path, tokenizer: object) -> tuple[dict, list[list[str]], dict]:
    """Write the per-domain split files; return them, the pretraining documents per domain and the split sizes."""
    rng = np.random.default_rng([settings.seed, 7])
    files: dict[str, dict[str, str]] = {name: {} for name in ("sft_train", "sft_val", "sft_test", "raw_val", "raw_test")}
    docs, sizes = [], {}
    for d in DOMAINS:
        raw = [r["text"] for r in read_jsonl(DATA / "raw" / f"{d}.jsonl") if r["text"].strip()]
        order = rng.permutation(len(raw))
        cut = (settings.raw_val_per_domain, settings.raw_val_per_domain + settings.raw_test_per_domain)
        raw_parts = {"raw_val": order[: cut[0]], "raw_test": order[cut[0] : cut[1]], "raw_train": order[cut[1] :]}
        rows = read_jsonl(DATA / "sft" / f"{d}.jsonl")
        # +3: BOS, EOS and a margin for the template's token boundaries.
        lengths = np.array([len(tokenizer.encode(render_simple(r), add_special_tokens=False)) + 3 for r in rows])
        fits = np.flatnonzero(lengths <= settings.sft_seq_len)
        fits = fits[rng.permutation(fits.size)]
        bounds = np.cumsum([settings.sft_val_per_domain, settings.sft_test_per_domain, settings.sft_train_per_domain])
        sft_parts = {"sft_val": fits[: bounds[0]], "sft_test": fits[bounds[0] : bounds[1]], "sft_train": fits[bounds[1] : bounds[2]]}
        for name, index in sft_parts.items():
            files[name][d] = str(work / "data" / name / f"{d}.jsonl")
            write_jsonl(Path(files[name][d]), [rows[i] for i in sorted(index)])
        for name in ("raw_val", "raw_test"):
            files[name][d] = str(work / "data" / name / f"{d}.jsonl")
            write_jsonl(Path(files[name][d]), [{"text": raw[i]} for i in sorted(raw_parts[name])])
        used = set(np.concatenate(list(sft_parts.values())).tolist())
        leftover = [render_simple(r) for i, r in enumerate(rows) if i not in used]
        docs.append([raw[i] for i in sorted(raw_parts["raw_train"])] + leftover)
        sizes[d] = {"sft_rows": len(rows), "sft_fit_seq_len": int(fits.size), **{k: int(v.size) for k, v in sft_parts.items()},
                    "raw_val": int(raw_parts["raw_val"].size), "raw_test": int(raw_parts["raw_test"].size),
                    "pretrain_raw": int(raw_parts["raw_train"].size), "pretrain_sft_rows": len(leftover)}
    return files, docs, sizes


def ensure_base(work: Path, settings: BaseSettings) -> BaseSetup:
    """Build (or reuse, when work/base.json matches `settings`) the data splits and the pretrained base.

    Pretraining resumes from work/pretrain/state.pt when it was interrupted (same settings)."""
    marker = work / "base.json"
    key = settings_key(settings)
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("key") == key and (work / "model" / "model.safetensors").is_file():
            logger.info("reusing the base model in %s", work)
            return BaseSetup(work, work / "model", saved["files"], saved["info"])
    if not (DATA / "sft").is_dir():
        raise SystemExit(f"the data bundle is not at {DATA} (set VERSATUNE_SHARED_DATA)")
    sys.path.insert(0, str(REPO / "bench"))
    import base_pretrain
    import domain_eval
    from probe_fidelity import TRUTH  # the known skew, one source for both controlled benchmarks
    from transformers import AutoTokenizer

    from versatune_ds.tiny_model import build_tiny_model_dir

    started = time.perf_counter()
    state_dir = work / "pretrain"
    model_dir = work / "model"
    progress = state_dir / "settings.json"
    if progress.is_file() and json.loads(progress.read_text()).get("key") != key:
        raise SystemExit(f"{state_dir} holds an interrupted pretraining with other settings; remove {work} to start over")
    if not (model_dir / "tokenizer.json").is_file():
        raw_all = [r["text"] for d in DOMAINS for r in read_jsonl(DATA / "raw" / f"{d}.jsonl") if r["text"].strip()]
        vocab_texts = raw_all + [render_simple(r) for d in DOMAINS for r in read_jsonl(DATA / "sft" / f"{d}.jsonl")]
        build_tiny_model_dir(model_dir, vocab_texts, vocab_size=settings.vocab, hidden_size=settings.hidden,
                             num_layers=settings.layers, num_heads=settings.heads, seed=settings.seed, chat_template=False)
    state_dir.mkdir(parents=True, exist_ok=True)
    progress.write_text(json.dumps({"key": key, "settings": asdict(settings)}, indent=2))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    files, docs, sizes = _split(settings, work, tokenizer)
    heldout = [domain_eval.raw_examples(tokenizer, [r["text"] for r in read_jsonl(files["raw_val"][d])], i, settings.pretrain.seq_len)
               for i, d in enumerate(DOMAINS)]
    record = base_pretrain.pretrain(model_dir, docs, TRUTH, heldout, settings.pretrain, seed=settings.seed, state_dir=state_dir)
    info = {
        "truth": dict(zip(DOMAINS, TRUTH.tolist())), "pretraining": record, "settings": asdict(settings), "split": sizes,
        "parameters": _count_parameters(model_dir), "seconds_this_session": time.perf_counter() - started,
        "tokenizer_note": "BPE vocabulary trained on all raw + sft text (vocabulary only; no weights see held-out rows)",
    }
    marker.write_text(json.dumps({"key": key, "files": files, "info": info}, indent=2))
    return BaseSetup(work, model_dir, files, info)


def open_base(work: Path) -> BaseSetup:
    """The base finished in `work` (any settings; a smoke test's small one too), or, when there is none yet,
    the default one built there (hours; resumable). A finished base with other than the default settings is
    used as it is, with a warning; its settings are in every result."""
    marker = work / "base.json"
    if marker.is_file() and (work / "model" / "model.safetensors").is_file():
        saved = json.loads(marker.read_text())
        if saved.get("key") != settings_key(BaseSettings()):
            logger.warning("the base in %s was built with other than the default settings (%s)", work, saved["info"]["settings"])
        return BaseSetup(work, work / "model", saved["files"], saved["info"])
    return ensure_base(work, BaseSettings())


def _count_parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="np") as handle:
        return int(sum(np.prod(handle.get_slice(k).get_shape()) for k in handle.keys()))


_EXAMPLES: dict[str, dict[str, list]] = {}  # tokenized held-out sets per base folder, made once per process


def eval_examples(base: BaseSetup) -> dict[str, list]:
    """The four held-out sets as tokenized examples per domain (raw: BOS + passage + EOS; sft: the `simple` template)."""
    if str(base.work) not in _EXAMPLES:
        _EXAMPLES[str(base.work)] = _tokenize_eval_sets(base)
    return _EXAMPLES[str(base.work)]


def _tokenize_eval_sets(base: BaseSetup) -> dict[str, list]:
    import domain_eval
    from transformers import AutoTokenizer

    from versatune_ds.domains import Domains

    tokenizer = AutoTokenizer.from_pretrained(base.model_dir)
    domains = Domains.from_names(DOMAINS)
    seq_len = base.info["settings"]["sft_seq_len"]
    out = {}
    for name in EVAL_SETS:
        if name.startswith("raw"):
            out[name] = [domain_eval.raw_examples(tokenizer, [r["text"] for r in read_jsonl(base.files[name][d])], i,
                                                  base.info["settings"]["pretrain"]["seq_len"]) for i, d in enumerate(DOMAINS)]
        else:
            out[name] = [domain_eval.sft_examples(tokenizer, base.files[name][d], domains, i, seq_len) for i, d in enumerate(DOMAINS)]
    return out


def score_model(base: BaseSetup, model_dir: Path, checkpoint: tuple[str, str] | None = None, *, sets: Sequence[str] = EVAL_SETS,
                examples: dict | None = None) -> dict:
    import domain_eval
    from transformers import AutoTokenizer

    examples = examples if examples is not None else eval_examples(base)
    pad = AutoTokenizer.from_pretrained(base.model_dir).pad_token_id
    model = domain_eval.load_model(model_dir, checkpoint)
    return domain_eval.to_json(domain_eval.score_domains(model, {s: examples[s] for s in sets}, pad_token_id=pad), DOMAINS)


def ensure_base_eval(base: BaseSetup) -> dict:
    """The base scored per item on raw_val, raw_test, sft_val and sft_test (cached in work/base_eval.json)."""
    path = base.work / "base_eval.json"
    if not path.is_file():
        started = time.perf_counter()
        doc = score_model(base, base.model_dir)
        doc["seconds"] = time.perf_counter() - started
        path.write_text(json.dumps(doc))
    return json.loads(path.read_text())


def evaluate_run(base: BaseSetup, run_dir: Path, *, final_sets: Sequence[str] = ("raw_test", "sft_test"),
                 curve_sets: Sequence[str] = ("raw_test",)) -> dict:
    """A finished run scored per item: final/ on `final_sets`, and every kept DeepSpeed checkpoint before the last
    step on `curve_sets` (the forgetting curves). Cached in run_dir/domain_eval.json (a cached document missing a
    set asked for now, final or curve, is scored again)."""
    path = Path(run_dir) / "domain_eval.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if all(s in cached["final"] for s in final_sets) and all(s in c for c in cached["checkpoints"].values() for s in curve_sets):
            return cached
    started = time.perf_counter()
    examples = eval_examples(base)
    max_steps = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"))["train"]["max_steps"]
    doc = {"final": score_model(base, Path(run_dir) / "final", sets=final_sets, examples=examples), "final_step": int(max_steps),
           "checkpoints": {}}
    root = Path(run_dir) / "checkpoints"
    tags = sorted((p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step")), key=_tag_step) if root.is_dir() else []
    for tag in tags:
        if curve_sets and _tag_step(tag) != int(max_steps):  # the checkpoint at the last step holds the final model's weights
            doc["checkpoints"][str(_tag_step(tag))] = score_model(base, base.model_dir, (str(root), tag), sets=curve_sets, examples=examples)
    doc["seconds"] = time.perf_counter() - started
    path.write_text(json.dumps(doc))
    return doc


def _tag_step(tag: str) -> int:
    digits = "".join(ch for ch in tag if ch.isdigit())
    return int(digits) if digits else -1


def train_job(work: Path, base: BaseSetup, name: str, sections: dict[str, dict], **fixed: dict) -> Job | None:
    """The `versatune-ds train` job of run `name` (config under work/configs, log under work/logs), or None when the
    run directory (`sections["train"]["run_dir"]`) holds a finished run of this base whose saved config has every value
    of `sections` (reused). `sections` (mixture=, train=, eval=, ...) decide the result; `fixed` (dist=, ...) are
    written but do not decide reuse. A half-finished run, or one made with other flags (steps, lr, schedule, weights,
    base), is removed and redone: never reused silently by its name."""
    run_dir = Path(sections["train"]["run_dir"])
    wanted = {"model": {"path": str(base.model_dir)}, **sections}
    if (run_dir / "final" / "config.json").is_file() and (run_dir / "config.yaml").is_file():
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        if all((saved.get(section) or {}).get(key) == value for section, values in wanted.items() for key, value in values.items()):
            return None
    shutil.rmtree(run_dir, ignore_errors=True)
    config = write_run_config(work / "configs" / f"{name}.yaml", base, **sections, **fixed)
    return Job(name, ("train", "--config", str(config)), work / "logs" / f"{name}.log")


def write_run_config(path: Path, base: BaseSetup, **sections: dict) -> Path:
    """A run config over the base's splits; `sections` (model=..., mixture=..., train=...) are merged on top."""
    config: dict = {
        "model": {"path": str(base.model_dir), "dtype": "fp32"},
        "data": {
            "domains": [{"name": d, "train": [base.train_files[d]], "heldout": [base.heldout_files[d]], "raw": [str(DATA / "raw" / f"{d}.jsonl")]}
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


def record_sft_wall(work: Path, jobs: Sequence[Job], job_seconds: dict[str, float], seconds: float, parallel: int) -> dict:
    """Persist the wall time of the SFT runs (a later invocation that reuses finished runs reports it too)."""
    path = work / "sft_wall.json"
    if jobs:
        previous = json.loads(path.read_text()) if path.is_file() else {"seconds": 0.0, "jobs": {}}
        record = {"seconds": previous["seconds"] + seconds, "jobs": {**previous["jobs"], **job_seconds}, "parallel": parallel}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))
    return json.loads(path.read_text()) if path.is_file() else {"seconds": 0.0, "jobs": {}, "parallel": parallel}
