"""Training throughput side by side: our loop vs TRL SFTTrainer (+ packing, BFD), TRL without packing, the HF Trainer.

    pip install -e '.[bench]'     # TRL (pinned); or see "Installing the peers" below
    python bench/get_smollm2.py --out runs/smollm2
    python bench/peer_throughput.py --models tiny smollm2 --repeats 2

What is the same for every pipeline (the fairness rules of the issue):

- the model folder and tokenizer; fp32; attention as `model.attn_implementation=auto` resolves (sdpa on CPU);
- the rows: every (prompt, answer) row of the six domains of ../shared/data/sft (data/sample without it) is
  rendered with the tokenizer's chat template and tokenized ONCE, by our pipeline (`data.templates`), and kept
  only if it fits seq_len whole, answer included (no truncation anywhere, so no pipeline drops or cuts what
  another keeps); 2 rows per domain are set aside as our held-out set (never trained on by anyone). The rest is
  written as `rows/train/<domain>.jsonl` (messages, what `ours` and `hf_trainer` read) and
  `rows/tokenized.jsonl` (input_ids + assistant-only labels, what TRL reads) -- the same tokens either way;
- assistant-only loss (the same labels); seq_len; micro-batch per rank; 2 ranks (gloo on CPU); the global
  batch; the DeepSpeed dict (`build_ds_config` of the shipped `ds_configs/zero3.json` or `--ds-config`);
  AdamW (torch), constant LR, clipping 1.0; the steps and the warm-up steps left out of the timing;
- the measurement: each run notes when every optimizer step begins; tokens/s = the tokens of steps
  [warmup, steps) over the time from the start of step `warmup` to the start of step `steps`, i.e. whole loop
  iterations (batch fetch + collation + forward + backward + optimizer + logging). Non-pad tokens and
  loss-bearing tokens (label positions scored after the causal shift) are counted in the batches each pipeline
  actually fed: the peers' collators are wrapped to count; ours reports them in metrics.jsonl. Peak RSS: every
  rank's own getrusage maxrss at the start of step `steps` (model load included).

How the pipelines differ (what is being compared): ours packs examples of one domain per row by best-fit
decreasing and draws rows with the mixture sampler (`mixture.strategy=proportional`, so every token is as likely
as under the peers' uniform shuffle); TRL + packing packs the union by BFD and flattens each micro-batch into one
padding-free row; TRL without packing pads each micro-batch to its longest example; the HF Trainer is fed our
packed rows with our collator (its strongest setting). See bench/peer_workers.py.

Runs are interleaved: repeat 1 runs ours, trl_packing, trl_nopack, hf_trainer; repeat 2 the reverse order; and so
on; the medians over repeats are reported. Results: bench/results/peer_throughput.{json,md} (`--results-name`).

Installing the peers: `pip install -e '.[bench]'` pins TRL; into an environment whose torch / transformers /
datasets / accelerate must not move, `pip install --no-deps trl==1.16.0` (TRL 1.16.0 needs transformers>=4.56.2,
datasets>=4.7, accelerate>=1.10.1, Python>=3.11; checked against transformers 5.24, datasets 5.2, accelerate 1.15).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import DATA, OUT, REPO, machine_info, versions, write_results  # noqa: E402
from peer_workers import PIPELINES  # noqa: E402

DOMAINS = ("law", "medicine", "finance", "science", "code", "general")
HELDOUT_PER_DOMAIN = 2
WORK = OUT / "peer_throughput"
DEFAULT_STEPS = {"tiny": (40, 10), "smollm2": (10, 2)}  # (steps timed + warm-up, warm-up)
LABELS = {"ours": "ours", "trl_packing": "TRL + packing (BFD)", "trl_nopack": "TRL, no packing", "hf_trainer": "HF Trainer"}


# ----------------------------------------------------------------------------------------------
# One row selection for everybody


def select_rows(model_dir: Path, data_dir: Path, seq_len: int, out: Path, max_per_domain: int | None) -> dict:
    """Tokenize every row once with our template; keep the rows that fit seq_len whole; write them for all pipelines."""
    from versatune_ds.config.schema import DataConfig, DomainConfig, ModelConfig
    from versatune_ds.data import templates
    from versatune_ds.data.diagnostics import Diagnostics
    from versatune_ds.data.packing import IGNORE_INDEX
    from versatune_ds.data.records import read_records
    from versatune_ds.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    tokenizer = load_tokenizer(ModelConfig(path=str(model_dir)))
    template = templates.resolve_template(tokenizer, "auto")
    key = {"model": str(model_dir), "tokenizer": tokenizer_fingerprint(tokenizer), "data": str(data_dir), "seq_len": seq_len,
           "template": template.fingerprint, "max_per_domain": max_per_domain, "heldout_per_domain": HELDOUT_PER_DOMAIN,
           "files": {d: os.stat(data_dir / f"{d}.jsonl").st_mtime_ns for d in DOMAINS}}
    summary_file = out / "selection.json"
    if summary_file.is_file() and json.loads(summary_file.read_text())["key"] == key:
        return json.loads(summary_file.read_text())
    shutil.rmtree(out, ignore_errors=True)
    (out / "train").mkdir(parents=True)
    (out / "heldout").mkdir()
    per_domain, tokenized = {}, []
    for domain in DOMAINS:
        diagnostics = Diagnostics()
        records = read_records([str(data_dir / f"{domain}.jsonl")], DomainConfig(name=domain), DataConfig(on_bad_row="skip"),
                               f"domain {domain}", diagnostics)
        batch = templates.tokenize_batch({"conversation": [r.conversation_json() for r in records]}, tokenizer, template)
        fits, too_long, unusable = [], 0, diagnostics.num_skipped
        for i, (ids, labels, error) in enumerate(zip(batch["input_ids"], batch["labels"], batch["error"])):
            if error or not any(label != IGNORE_INDEX for label in labels):
                unusable += 1
            elif len(ids) > seq_len:
                too_long += 1
            else:
                fits.append(i)
        if len(fits) <= HELDOUT_PER_DOMAIN:
            raise SystemExit(f"domain {domain}: only {len(fits)} of {len(records)} rows fit seq_len={seq_len} whole; "
                             f"{HELDOUT_PER_DOMAIN + 1} are needed (held-out + training): raise --seq-len")
        heldout, train = fits[:HELDOUT_PER_DOMAIN], fits[HELDOUT_PER_DOMAIN:]
        if max_per_domain is not None:
            train = train[:max_per_domain]
        for name, chosen in (("train", train), ("heldout", heldout)):
            with open(out / name / f"{domain}.jsonl", "w", encoding="utf-8") as handle:
                for i in chosen:
                    messages = [{k: v for k, v in m.items() if k != "loss"} for m in records[i].messages]  # plain OpenAI rows
                    handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        for i in train:
            tokenized.append({"domain": domain, "input_ids": list(map(int, batch["input_ids"][i])),
                              "labels": list(map(int, batch["labels"][i]))})
        per_domain[domain] = {
            "rows_read": len(records) + diagnostics.num_skipped, "train_rows": len(train), "heldout_rows": len(heldout),
            "dropped_too_long": too_long, "dropped_unusable": unusable,
            "train_tokens": int(sum(len(batch["input_ids"][i]) for i in train)),
            "train_loss_tokens": int(sum(sum(1 for x in batch["labels"][i] if x != IGNORE_INDEX) for i in train)),
        }
    with open(out / "tokenized.jsonl", "w", encoding="utf-8") as handle:
        for row in tokenized:
            handle.write(json.dumps(row) + "\n")
    summary = {"key": key, "template": template.name, "per_domain": per_domain}
    summary_file.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def write_run_config(path: Path, model_dir: Path, rows: Path, args: argparse.Namespace, cache_dir: Path = WORK / "cache") -> Path:
    """The run config of `ours`; the peers read their batch, optimizer and DeepSpeed settings from it too."""
    import yaml

    domains = [{"name": d, "train": [str(rows / "train" / f"{d}.jsonl")], "heldout": [str(rows / "heldout" / f"{d}.jsonl")]}
               for d in DOMAINS]
    config = {
        "model": {"path": str(model_dir), "dtype": args.dtype},
        # truncation=error: every selected row fits, so a mismatch with the selection fails loudly.
        "data": {"domains": domains, "seq_len": args.seq_len, "packing": True, "truncation": "error", "on_bad_row": "error",
                 "cache_dir": str(cache_dir)},
        "mixture": {"strategy": "proportional"},
        "train": {"seed": 0, "micro_batch_size": args.micro_batch_size, "gradient_accumulation_steps": 1,
                  "learning_rate": 1e-4, "lr_scheduler": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                  "max_grad_norm": 1.0, "log_every": 1},
        "eval": {"every": 10**6, "at_start": False},
        "checkpoint": {"every": 10**6, "keep_last": 1},
        "export": {"at_end": False},
        "deepspeed": {"config": args.ds_config},
        "dist": {"timeout_s": 1800},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def verify_rows(config: Path, selection: dict) -> None:
    """Our data pipeline, reading the written files, must give exactly the selected examples and tokens (fills its cache)."""
    from versatune_ds.config.loading import load_config
    from versatune_ds.data.prepare import prepare_data
    from versatune_ds.data.tokenizer import load_tokenizer

    cfg = load_config(str(config), [])
    data = prepare_data(cfg.data, load_tokenizer(cfg.model))
    for domain, prepared in zip(DOMAINS, data.per_domain):
        want = selection["per_domain"][domain]
        got = {"train_rows": prepared.train_examples, "train_tokens": prepared.train_tokens, "train_loss_tokens": prepared.train_loss_tokens}
        if any(want[k] != v for k, v in got.items()):
            raise SystemExit(f"domain {domain}: our pipeline read {got} from the selected rows, the selection holds "
                             f"{ {k: want[k] for k in got} }; the files under {config.parent / 'rows'} do not round-trip")


# ----------------------------------------------------------------------------------------------
# Running and measuring


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_pipeline(pipeline: str, model: str, config: Path, rows: Path, steps: int, warmup: int, args: argparse.Namespace,
                 run_number: int) -> dict:
    """One 2-rank launch of one pipeline; its per-rank records turned into tokens/s and peak RSS."""
    run_dir = WORK / model / "runs" / f"{run_number:02d}_{pipeline}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    spec = {"config": str(config), "run_dir": str(run_dir / "run"), "out_dir": str(run_dir), "steps": steps,
            "tokenized": str(rows / "tokenized.jsonl"), "dtype": args.dtype}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    env.pop("MASTER_PORT", None)
    if not cuda_available():
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator (gloo), without its warning
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nnodes=1", f"--nproc_per_node={args.ranks}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(REPO / "bench" / "peer_workers.py"),
           pipeline, str(run_dir / "spec.json")]
    started = time.perf_counter()
    with open(run_dir / "log.txt", "w", encoding="utf-8") as log:
        code = subprocess.run(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout_s).returncode
    wall = time.perf_counter() - started
    records = [run_dir / f"rank{r}.json" for r in range(args.ranks)]
    if not all(p.is_file() for p in records):
        tail = "\n".join((run_dir / "log.txt").read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"{pipeline} on {model} failed (exit {code}); log {run_dir / 'log.txt'}:\n{tail}")
    result = measure([json.loads(p.read_text()) for p in records], warmup, steps)
    result.update({"pipeline": pipeline, "exit_code": code, "launch_wall_s": round(wall, 1), "load_avg_after": os.getloadavg()[0]})
    if not args.keep_runs:
        shutil.rmtree(run_dir / "run", ignore_errors=True)
    return result


def measure(records: list[dict], warmup: int, steps: int) -> dict:
    """Tokens/s over the whole loop iterations [warmup, steps) from the per-rank records (see peer_workers.py)."""
    records = sorted(records, key=lambda r: r["rank"])
    begins = records[0]["begins"]
    if len(begins) != steps + 1:
        raise SystemExit(f"{records[0]['pipeline']}: {len(begins)} step starts noted, expected {steps + 1}")
    if records[0]["counts_are_global"]:
        nonpad, loss = records[0]["nonpad_tokens"], records[0]["loss_tokens"]
    else:  # per-rank counts: sum over ranks, step by step
        nonpad = [sum(r["nonpad_tokens"][s] for r in records) for s in range(steps)]
        loss = [sum(r["loss_tokens"][s] for r in records) for s in range(steps)]
    seconds = begins[steps] - begins[warmup]
    timed = range(warmup, steps)
    return {
        "steps_timed": len(timed), "seconds": round(seconds, 3), "s_per_step": round(seconds / len(timed), 4),
        "nonpad_tokens": int(sum(nonpad[s] for s in timed)), "loss_tokens": int(sum(loss[s] for s in timed)),
        "nonpad_tokens_per_s": sum(nonpad[s] for s in timed) / seconds, "loss_tokens_per_s": sum(loss[s] for s in timed) / seconds,
        "peak_rss_mib_per_rank": [r["peak_rss_mib"] for r in records],
        "step_seconds": [round(b - a, 4) for a, b in zip(begins, begins[1:])],
    }


def summarize(runs: dict[str, list[dict]]) -> dict:
    def median(pipeline: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[pipeline])

    out: dict = {}
    for pipeline, results in runs.items():
        out[pipeline] = {
            "nonpad_tokens_per_s": median(pipeline, "nonpad_tokens_per_s"),
            "loss_tokens_per_s": median(pipeline, "loss_tokens_per_s"),
            "s_per_step": median(pipeline, "s_per_step"),
            "peak_rss_mib_per_rank_max": max(max(r["peak_rss_mib_per_rank"]) for r in results),
            "nonpad_tokens_per_s_runs": [round(r["nonpad_tokens_per_s"], 1) for r in results],
            "loss_tokens_per_s_runs": [round(r["loss_tokens_per_s"], 1) for r in results],
        }
    peers = [p for p in runs if p != "ours"]
    if "ours" in runs and peers:
        for key in ("nonpad_tokens_per_s", "loss_tokens_per_s"):
            fastest = max(peers, key=lambda p: out[p][key])
            out[f"ratio_{key}"] = {"fastest_peer": fastest, "ours_over_fastest": out["ours"][key] / out[fastest][key]}
    return out


def markdown(results: dict) -> str:
    setup = results["setup"]
    lines = ["# Throughput side by side: ours vs TRL (packing / no packing) vs HF Trainer", "",
             f"{setup['ranks']} ranks x {setup['threads_per_rank']} thread(s), gloo, {setup['dtype']}, DeepSpeed `{setup['ds_config']}`, "
             f"seq_len {setup['seq_len']}, micro-batch {setup['micro_batch_size']} per rank, the same selected rows for all "
             f"(rows that fit seq_len whole; assistant-only loss), {setup['repeats']} interleaved repeats, medians. "
             "Non-pad tokens/s and loss-bearing tokens/s count the tokens of the batches each pipeline actually fed.", ""]
    for name, model in results["models"].items():
        s = model["summary"]
        lines += [f"## {name} (`{model['model_dir']}`)", "",
                  f"Rows: {model['train_rows']} training rows ({model['train_tokens']} tokens, {model['train_loss_tokens']} loss tokens) "
                  f"of {model['rows_read']} read; {model['dropped_too_long']} longer than seq_len, {model['dropped_unusable']} unusable. "
                  f"Steps: {model['steps']} per run, the first {model['warmup']} untimed.", "",
                  "| pipeline | non-pad tokens/s | loss tokens/s | s/step | peak RSS / rank (MiB) | runs (non-pad tokens/s) |",
                  "|---|---|---|---|---|---|"]
        for pipeline in PIPELINES:
            if pipeline in s:
                p = s[pipeline]
                lines.append(f"| {LABELS[pipeline]} | {p['nonpad_tokens_per_s']:.0f} | {p['loss_tokens_per_s']:.0f} | {p['s_per_step']:.3f} | "
                             f"{p['peak_rss_mib_per_rank_max']:.0f} | {', '.join(f'{x:.0f}' for x in p['nonpad_tokens_per_s_runs'])} |")
        for key, label in (("nonpad_tokens_per_s", "non-pad tokens/s"), ("loss_tokens_per_s", "loss tokens/s")):
            ratio = s.get(f"ratio_{key}")
            if ratio:
                lines += ["", f"ours / fastest peer ({LABELS[ratio['fastest_peer']]}), {label}: **{ratio['ours_over_fastest']:.2f}x**"]
        lines.append("")
    lines += [f"Load average (1 min) over the runs: {results['load_avg_range'][0]:.1f}-{results['load_avg_range'][1]:.1f}; "
              f"machine: {results['machine']['nproc']} CPUs. Versions: {json.dumps(results['versions'])}.", "",
              f"Command: `{results['command']}`"]
    if results.get("note"):
        lines += ["", results["note"]]
    return "\n".join(lines)


def ensure_model(name: str, args: argparse.Namespace) -> Path:
    folder = Path(args.tiny_dir if name == "tiny" else args.smollm2_dir).resolve()
    if (folder / "config.json").is_file():
        return folder
    if name == "smollm2":
        raise SystemExit(f"{folder} not found; make it first: python bench/get_smollm2.py --out {folder}")
    # The quickstart's tiny model (scripts/quickstart.sh).
    sample = sorted(str(p) for p in (REPO / "data" / "sample").glob("*.jsonl"))
    subprocess.run([sys.executable, "-m", "versatune_ds", "tiny-model", "--out", str(folder), "--text", *sample], cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per run, warm-up included (default: 40 tiny, 10 smollm2)")
    parser.add_argument("--warmup", type=int, default=-1, help="first steps left out of the timing (default: 10 tiny, 2 smollm2)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (OMP_NUM_THREADS)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--ds-config", default="zero3", help="a shipped DeepSpeed config name or a JSON path (every pipeline gets it)")
    parser.add_argument("--max-rows-per-domain", type=int, default=None, help="cap on training rows per domain (all by default)")
    parser.add_argument("--data-dir", default=str(DATA / "sft" if (DATA / "sft").is_dir() else REPO / "data" / "sample"))
    parser.add_argument("--tiny-dir", default=str(REPO / "runs" / "tiny-model"))
    parser.add_argument("--smollm2-dir", default=str(REPO / "runs" / "smollm2"))
    parser.add_argument("--timeout-s", type=int, default=3600, help="per launch")
    parser.add_argument("--keep-runs", action="store_true", help="keep each run's run dir (metrics.jsonl, logs) under bench/out")
    parser.add_argument("--results-name", default="peer_throughput")
    parser.add_argument("--note", default="", help="a line added to the Markdown (where and how it ran)")
    args = parser.parse_args()
    if any(p.startswith("trl") for p in args.pipelines):
        import importlib.util

        if importlib.util.find_spec("trl") is None:
            raise SystemExit("the TRL pipelines need TRL: pip install -e '.[bench]' (or pip install --no-deps trl==1.16.0), "
                             "or leave them out with --pipelines ours hf_trainer")

    results: dict = {"setup": {"ranks": args.ranks, "threads_per_rank": args.threads, "dtype": args.dtype, "ds_config": args.ds_config,
                               "seq_len": args.seq_len, "micro_batch_size": args.micro_batch_size, "repeats": args.repeats,
                               "data": args.data_dir, "pipelines": args.pipelines, "order": "repeat k runs the pipelines "
                               "in the listed order when k is even, reversed when odd"},
                     "models": {}, "command": "python " + " ".join([str(Path(sys.argv[0]).relative_to(REPO)) if Path(sys.argv[0]).is_absolute() else sys.argv[0], *sys.argv[1:]]),
                     "note": args.note}
    loads = [os.getloadavg()[0]]
    run_number = 0
    for name in args.models:
        model_dir = ensure_model(name, args)
        steps = args.steps or DEFAULT_STEPS[name][0]
        warmup = args.warmup if args.warmup >= 0 else DEFAULT_STEPS[name][1]
        if steps <= warmup:
            raise SystemExit(f"--steps ({steps}) must be larger than --warmup ({warmup})")
        rows = WORK / name / "rows"
        selection = select_rows(model_dir, Path(args.data_dir), args.seq_len, rows, args.max_rows_per_domain)
        config = write_run_config(WORK / name / "ours.yaml", model_dir, rows, args)
        verify_rows(config, selection)
        runs: dict[str, list[dict]] = {p: [] for p in args.pipelines}
        for repeat in range(args.repeats):
            for pipeline in (args.pipelines if repeat % 2 == 0 else list(reversed(args.pipelines))):
                run_number += 1
                result = run_pipeline(pipeline, name, config, rows, steps, warmup, args, run_number)
                runs[pipeline].append(result)
                loads.append(result["load_avg_after"])
                print(f"{name} {pipeline} (repeat {repeat + 1}): {result['nonpad_tokens_per_s']:.0f} non-pad tokens/s, "
                      f"{result['loss_tokens_per_s']:.0f} loss tokens/s, {result['s_per_step']:.3f} s/step, "
                      f"peak RSS {result['peak_rss_mib_per_rank']} MiB", flush=True)
        per_domain = selection["per_domain"].values()
        results["models"][name] = {
            "model_dir": str(model_dir), "steps": steps, "warmup": warmup, "template": selection["template"],
            **{k: sum(d[k] for d in per_domain) for k in ("rows_read", "train_rows", "dropped_too_long", "dropped_unusable",
                                                          "train_tokens", "train_loss_tokens")},
            "selection_per_domain": selection["per_domain"], "runs": runs, "summary": summarize(runs),
        }
    results["load_avg_range"] = [min(loads), max(loads)]
    results["machine"] = machine_info()
    import importlib.util
    from importlib.metadata import version

    results["versions"] = {**versions(), **{p: version(p) for p in ("trl", "accelerate", "datasets") if importlib.util.find_spec(p)}}
    text = markdown(results)
    write_results(args.results_name, results, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
