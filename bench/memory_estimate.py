"""`versatune-ds estimate-memory --config` against the measured peak resident memory of every rank of `train`.

    python bench/memory_estimate.py [--jobs tiny smollm2 probe128k_plain probe128k_chunked] [--steps 3]

Each job is a real `train` run on the CPU (fp32, ZeRO-3 unless said otherwise, DeepSpeed's shipped zero3.json),
its ranks started as plain processes so the kernel reports each one's peak RSS when it is reaped
(bench/rank_memory.py). A wrapper records the resident memory and its high-water mark after each phase (data,
model load, engine, every step, evaluation, checkpoint, export), so the table says which phase set the peak.
The estimate is what `estimate-memory --config <the same run config> --nodes 1 --gpus-per-node <ranks>
--device cpu` prints for a rank (engine.memory_model), computed in this process from the same config.

| job | model | ranks | seq_len x micro | what it probes |
|---|---|---|---|---|
| tiny | the quickstart's tiny Llama (runs/tiny-model) | 2 | 256 x 2 | the fixed cost of a process |
| smollm2 | SmolLM2-135M-Instruct (runs/smollm2, bench/get_smollm2.py) | 2 | 512 x 2 | model states, ZeRO-3 gathering, activations |
| smollm2_gc | the same with gradient checkpointing | 2 | 512 x 2 | the checkpointed activations |
| probe128k_plain / _chunked | a Llama with Llama 3's 128 256 vocabulary, hidden 64 | 1 | 4096 x 1 | the loss path |

`--reuse-measurements` keeps runs already measured (bench/out/memory_estimate/<job>/measured.json) and recomputes
only the estimates. Data: the six domains of ../shared/data/sft (VERSATUNE_SHARED_DATA), else data/sample. Mixture `uniform` (no
probe: the estimate covers training, evaluation, checkpoints and the export at the end). Results:
bench/results/memory_estimate.{json,md}. RSS does not depend on timing; a loaded machine is fine, a machine
short of memory is not (the probe's plain job needs ~7 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml
from common import DATA, OUT, REPO, machine_info, run_logged, versions, write_results
from rank_memory import run_ranks

DOMAINS = ("law", "medicine", "finance", "science", "code", "general")
MIB = 2**20


def _mark_file() -> Path | None:
    value = os.environ.get("BENCH_MEMORY_MARKS")
    return Path(value) if value else None


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rank_worker(argv: list[str]) -> int:
    """Run `versatune-ds <argv>` recording (phase, RSS, high-water mark) lines; BENCH_PLAIN_LOSS=1: plain loss path."""
    sys.path.insert(0, str(REPO))
    import versatune_ds.engine.losses as losses
    import versatune_ds.engine.train_engine as train_engine
    import versatune_ds.train as train
    from versatune_ds import cli

    rank = os.environ.get("RANK", "0")
    marks = _mark_file()

    def mark(phase: str) -> None:
        if marks is not None:
            with open(marks.with_name(f"{marks.stem}_rank{rank}.jsonl"), "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"phase": phase, "rss_mib": _status_kib("VmRSS") / 1024, "hwm_mib": _status_kib("VmHWM") / 1024}) + "\n")

    def after(owner: object, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            result = original(*args, **kwargs)
            mark(label)
            return result

        setattr(owner, name, wrapped)

    after(train, "prepare_data", "data prepared")
    after(train, "load_model", "model loaded")
    after(train_engine.TrainEngine, "train_step", "train step")
    after(train, "evaluate", "evaluation")
    after(train.checkpoint, "save_checkpoint", "checkpoint saved")
    after(train, "export_from_engine", "exported")
    original_init = train_engine.TrainEngine.__init__

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if os.environ.get("BENCH_PLAIN_LOSS") == "1":
            kwargs["chunked_loss"] = False
        original_init(self, *args, **kwargs)
        mark("engine ready")

    train_engine.TrainEngine.__init__ = init
    del losses
    mark("imports")
    return cli.main(argv)


# ----------------------------------------------------------------------------------------------
# Jobs


def _data_section(seq_len: int, cache: Path) -> dict:
    sft = DATA / "sft"
    if sft.is_dir():
        domains = [{"name": d, "train": str(sft / f"{d}.jsonl")} for d in DOMAINS]
    else:
        domains = [{"name": d, "train": str(REPO / "data" / "sample" / f"{d}.jsonl")} for d in DOMAINS]
    return {"domains": domains, "seq_len": seq_len, "packing": True, "truncation": "truncate", "on_bad_row": "skip",
            "heldout_fraction": 0.05, "heldout_max_examples": 16, "cache_dir": str(cache)}


def _probe_model(folder: Path) -> Path:
    """A Llama with Llama 3's vocabulary and a tiny body; the tiny model's tokenizer (ids < 512 are all it uses)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (REPO / "runs" / "tiny-model" / name).is_file():
            shutil.copy(REPO / "runs" / "tiny-model" / name, folder / name)
    return folder


def job_config(name: str, folder: Path, steps: int) -> tuple[dict, int, dict[str, str]]:
    """(run config, ranks, extra environment) of a job."""
    cache = OUT / "memory_estimate" / "cache"
    if name == "tiny":
        model, seq, micro, accum, ranks, extra = REPO / "runs" / "tiny-model", 256, 2, 2, 2, {}
    elif name.startswith("smollm2"):
        model, seq, micro, accum, ranks, extra = REPO / "runs" / "smollm2", 512, 2, 2, 2, {}
    elif name.startswith("probe128k"):
        model, seq, micro, accum, ranks = _probe_model(OUT / "memory_estimate" / "probe128k_model"), 4096, 1, 1, 1
        extra = {"BENCH_PLAIN_LOSS": "1"} if name.endswith("plain") else {}
    else:
        raise SystemExit(f"unknown job {name}")
    config = {
        "model": {"path": str(model), "dtype": "fp32", "gradient_checkpointing": name.endswith("_gc")},
        "data": _data_section(seq, cache),
        "mixture": {"strategy": "uniform", "block_size": 64},
        "train": {"run_dir": str(folder / "run"), "max_steps": steps, "micro_batch_size": micro,
                  "gradient_accumulation_steps": accum, "learning_rate": 1e-5, "warmup_steps": 0},
        "eval": {"every": max(1, steps - 1), "micro_batch_size": micro, "at_start": False},
        "checkpoint": {"every": steps, "keep_last": 1},
        "deepspeed": {"config": "zero3"},
        "dist": {"timeout_s": 1800},
        "export": {"at_end": True},
    }
    return config, ranks, extra


def run(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    from versatune_ds.config.loading import load_config
    from versatune_ds.engine.memory_model import estimate_run

    if not (REPO / "runs" / "tiny-model" / "config.json").is_file():
        run_logged([sys.executable, "-m", "versatune_ds", "tiny-model", "--out", "runs/tiny-model", "--text",
                    *map(str, sorted((REPO / "data" / "sample").glob("*.jsonl")))], OUT / "memory_estimate" / "tiny_model.log")
    rows = []
    for name in args.jobs:
        folder = OUT / "memory_estimate" / name
        measured_file = folder / "measured.json"
        config, ranks, extra = job_config(name, folder, args.steps)
        config_file = folder / "run.yaml"
        if not (args.reuse_measurements and measured_file.is_file()):
            if folder.exists():
                import shutil

                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            config_file.write_text(yaml.safe_dump(config, sort_keys=False))
            peaks = run_ranks(["train", "--config", str(config_file)], nproc=ranks, log_dir=folder, threads=args.threads,
                              extra_env={**extra, "BENCH_MEMORY_MARKS": str(folder / "marks.jsonl")},
                              command=[sys.executable, str(Path(__file__).resolve()), "--rank-worker"])
            if any(peaks.exit_codes):
                raise SystemExit(f"{name}: a rank failed ({peaks.exit_codes}); logs in {folder}")
            measured_file.write_text(json.dumps({"peak_rss_bytes": peaks.peak_rss_bytes, "seconds": peaks.seconds}))
        measured = json.loads(measured_file.read_text())
        cfg = load_config(config_file)
        estimate = estimate_run(cfg, nodes=1, gpus_per_node=ranks, device="cpu", chunked_loss=not name.endswith("plain"))
        phases = [json.loads(line) for line in (folder / "marks_rank0.jsonl").read_text().splitlines()]
        peak = max(measured["peak_rss_bytes"])
        row = {"job": name, "ranks": ranks, "measured_peak_rss_mib": [round(p / MIB, 1) for p in measured["peak_rss_bytes"]],
               "estimate_mib": round(estimate.host_per_rank_bytes / MIB, 1),
               "error": estimate.host_per_rank_bytes / peak - 1, "seconds": round(measured["seconds"], 1),
               "estimate_parts_mib": {k: round(v / MIB, 1) for k, v in estimate.host_parts.items()},
               "phases_rank0": phases}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "phases_rank0"}))
    lines = [
        "# Memory estimate vs measured peak RSS per rank (CPU)", "",
        f"`{' '.join(['python', 'bench/memory_estimate.py', *sys.argv[1:]])}`", "",
        "`train` runs on the CPU (fp32, shipped zero3.json, mixture uniform, an evaluation, a checkpoint and the "
        "export at the end); measured = the largest peak RSS of its ranks (the kernel's ru_maxrss); estimate = "
        "`versatune-ds estimate-memory --config <run config> --device cpu` per rank.", "",
        "| job | ranks | measured peak RSS per rank (MiB) | estimate (MiB) | error | phase that set the peak (rank 0) |",
        "|---|---:|---|---:|---:|---|",
    ]
    for r in rows:
        top = max(r["phases_rank0"], key=lambda p: p["hwm_mib"]) if r["phases_rank0"] else {"phase": "?"}
        first_at_top = next((p for p in r["phases_rank0"] if p["hwm_mib"] >= top.get("hwm_mib", 0)), top)
        lines.append(f"| {r['job']} | {r['ranks']} | {', '.join(f'{v:,.0f}' for v in r['measured_peak_rss_mib'])} | "
                     f"{r['estimate_mib']:,.0f} | {r['error']:+.1%} | {first_at_top['phase']} |")
    lines.append("")
    lines.append("Estimate parts (MiB): " + "; ".join(
        f"{r['job']}: " + ", ".join(f"{k} {v:,.0f}" for k, v in r["estimate_parts_mib"].items()) for r in rows))
    info = machine_info()
    lines += ["", f"Machine: {info['nproc']} CPUs, {info['ram_gib']} GiB, load at the end {info['load_avg_at_end']}."]
    write_results(args.name, {"args": vars(args), "rows": rows, "machine": info, "versions": versions()}, "\n".join(lines))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-worker":
        code = rank_worker(sys.argv[2:])
        sys.stdout.flush()
        os._exit(code)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", nargs="+", default=["tiny", "smollm2", "smollm2_gc", "probe128k_plain", "probe128k_chunked"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="memory_estimate", help="results file name under bench/results/")
    parser.add_argument("--reuse-measurements", action="store_true",
                        help="keep the runs already measured under bench/out/memory_estimate/<job>/ (recompute the estimates only)")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
