"""Peak host memory of `versatune-ds export`: the streamed, sharded export vs the previous one, and the 70B projection.

    python bench/export_memory.py [--shard-sizes 50MB 5GB] [--dtype bf16]

1. A ZeRO-3 checkpoint of SmolLM2-135M-Instruct (runs/smollm2, from bench/get_smollm2.py) is written by a one-step
   `train` on 2 CPU ranks (fp32).
2. Each export runs in a fresh process; its peak RSS comes from the kernel when it is reaped (ru_maxrss):
   - `previous`: what `export` did before this change -- DeepSpeed's zero_to_fp32 gathers the whole fp32 state
     dict, a `.to(dtype)` copy of it is made, then `save_pretrained` writes it;
   - `streamed <size>`: `versatune-ds export --max-shard-size <size>`.
   Every export is reloaded and compared with the first (same tensors).
3. The 70B projection applies the same accounting to Llama-3-70B's shapes (70.55 B parameters, largest tensor
   128 256 x 8 192): previous = fp32 state dict + the dtype copy; streamed = process + one shard + the largest
   tensor in fp32 + the 1 GiB of memory-mapped pages read between two re-mappings.

Results: bench/results/export_memory.{json,md}. RSS does not depend on timing (a loaded machine is fine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from common import DATA, OUT, REPO, cpu_env, machine_info, versions, write_results
from rank_memory import run_ranks

MIB = 2**20
GIB = 2**30
LLAMA3_70B_PARAMS = 70_553_706_496
LLAMA3_70B_LARGEST = 128_256 * 8_192


def previous_export(run_dir: str, out: str, dtype_name: str) -> None:
    """The export as it was: the whole fp32 state dict, a dtype copy, save_pretrained (kept here to measure it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from versatune_ds.config.loading import load_config
    from versatune_ds.engine import checkpoint, zero
    from versatune_ds.engine.models import TORCH_DTYPES

    cfg = load_config(Path(run_dir) / "config.yaml", check_files=False)
    folder = checkpoint.find_latest(run_dir)
    dtype = TORCH_DTYPES[dtype_name]
    state = {k: v.to(dtype) for k, v in zero.fp32_state_dict(str(folder.parent), folder.name).items()}
    config = AutoConfig.from_pretrained(cfg.model.path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)


def _checkpoint(folder: Path, model: Path) -> Path:
    run_dir = folder / "run"
    if (run_dir / "checkpoints" / "latest").is_file():
        return run_dir
    sft = DATA / "sft"
    train = [str(sft / f"{d}.jsonl") if sft.is_dir() else str(REPO / "data" / "sample" / f"{d}.jsonl") for d in ("law", "code")]
    config = {
        "model": {"path": str(model), "dtype": "fp32"},
        "data": {"domains": [{"name": n, "train": t} for n, t in zip(("law", "code"), train)], "seq_len": 256,
                 "truncation": "truncate", "on_bad_row": "skip", "heldout_max_examples": 4, "cache_dir": str(folder / "cache")},
        "mixture": {"strategy": "uniform", "block_size": 16},
        "train": {"run_dir": str(run_dir), "max_steps": 1, "micro_batch_size": 1, "gradient_accumulation_steps": 1},
        "eval": {"every": 100, "at_start": False}, "checkpoint": {"every": 1}, "deepspeed": {"config": "zero3"},
        "export": {"at_end": False}, "dist": {"timeout_s": 1800},
    }
    (folder / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    peaks = run_ranks(["train", "--config", str(folder / "run.yaml")], nproc=2, log_dir=folder / "train_logs")
    if any(peaks.exit_codes):
        raise SystemExit(f"the checkpointing run failed; logs in {folder / 'train_logs'}")
    return run_dir


def _measure(command: list[str], log: Path) -> int:
    with open(log, "w", encoding="utf-8") as handle:
        proc = subprocess.Popen(command, cwd=REPO, env=cpu_env(1), stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command[:6])} failed; log {log}")
    return int(usage.ru_maxrss) * 1024


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _same_tensors(a: Path, b: Path) -> bool:
    import torch

    left, right = _tensors(a), _tensors(b)
    common = set(left) & set(right)
    return bool(common) and all(torch.equal(left[k], right[k]) for k in common) and set(right) <= set(left)


def run(args: argparse.Namespace) -> None:
    model = Path(args.model).resolve()
    folder = OUT / "export_memory" / model.name
    folder.mkdir(parents=True, exist_ok=True)
    run_dir = _checkpoint(folder, model)
    rows = []
    previous_out = folder / "previous"
    shutil.rmtree(previous_out, ignore_errors=True)
    peak = _measure([sys.executable, __file__, "--previous", str(run_dir), str(previous_out), args.dtype], folder / "previous.log")
    rows.append({"export": "previous (whole fp32 state dict + dtype copy)", "peak_rss_mib": peak / MIB, "files": len(list(previous_out.glob("*.safetensors")))})
    for size in args.shard_sizes:
        out = folder / f"streamed_{size}"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "versatune_ds", "export", "--run-dir", str(run_dir), "--out", str(out),
                   "--max-shard-size", size, "--dtype", args.dtype]
        peak = _measure(command, folder / f"streamed_{size}.log")
        rows.append({"export": f"streamed, --max-shard-size {size}", "peak_rss_mib": peak / MIB,
                     "files": len(list(out.glob("*.safetensors"))), "same_tensors_as_previous": _same_tensors(out, previous_out)})
        print(json.dumps(rows[-1]))
    # A process that only imports what `export` imports: the fixed part of every row above.
    base = _measure([sys.executable, "-c", "import versatune_ds.engine.export, deepspeed"], folder / "imports.log")
    element = {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype]
    params = sum(t.numel() for t in _tensors(previous_out).values())
    smallest = min(rows[1:], key=lambda r: r["peak_rss_mib"])
    projection = {
        "previous_gib": LLAMA3_70B_PARAMS * (4 + element) / GIB,
        "streamed_5GB_gib": (base + 5e9 + LLAMA3_70B_LARGEST * 4 + GIB) / GIB,
    }
    lines = [
        "# Export: peak host memory", "", f"`{' '.join(['python', 'bench/export_memory.py', *sys.argv[1:]])}`", "",
        f"{model.name} ({params / 1e6:.1f} M parameters, {params * element / 1e6:.0f} MB in {args.dtype}), a ZeRO-3 checkpoint "
        "of 2 CPU ranks; each export a fresh process, peak RSS from the kernel (ru_maxrss). Imports alone: "
        f"{base / MIB:,.0f} MiB.", "",
        "| export | peak RSS (MiB) | above the imports (MiB) | safetensors files | same tensors as previous |", "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        same = r.get("same_tensors_as_previous", "-")
        lines.append(f"| {r['export']} | {r['peak_rss_mib']:,.0f} | {r['peak_rss_mib'] - base / MIB:,.0f} | {r['files']} | {same} |")
    lines += [
        "", f"Projection for Llama-3-70B ({LLAMA3_70B_PARAMS / 1e9:.2f} B parameters) exported in {args.dtype}: previous "
        f"~{projection['previous_gib']:,.0f} GiB of host memory (fp32 state dict + the {args.dtype} copy); streamed with "
        f"5 GB shards ~{projection['streamed_5GB_gib']:,.1f} GiB (imports + a shard + the largest tensor, 128256 x 8192, in "
        "fp32 + 1 GiB of mapped pages between re-mappings), whatever the model size. Smallest measured streamed peak here: "
        f"{smallest['peak_rss_mib']:,.0f} MiB.",
    ]
    info = machine_info()
    lines += ["", f"Machine: {info['nproc']} CPUs, {info['ram_gib']} GiB, load at the end {info['load_avg_at_end']}."]
    write_results(args.name, {"args": vars(args), "rows": rows, "imports_mib": base / MIB, "projection_70b": projection,
                                    "machine": info, "versions": versions()}, "\n".join(lines))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--previous":
        sys.path.insert(0, str(REPO))
        previous_export(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard-sizes", nargs="+", default=["50MB", "5GB"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--model", default=str(REPO / "runs" / "smollm2"), help="model folder (default: SmolLM2, bench/get_smollm2.py)")
    parser.add_argument("--name", default="export_memory", help="results file name under bench/results/")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
