"""Where one training step of our loop goes: `run_training` under ZeRO-3 (2 ranks, gloo, CPU), profiled by phase.

    python bench/get_smollm2.py --out runs/smollm2
    python bench/profile_step.py --models tiny smollm2 [--warmup 3] [--profile-steps 2] [--results-name profile_step]

The real loop (`versatune_ds.train.run_training`, what `versatune-ds train` runs) on the rows of
bench/peer_throughput.py (the same selection, seq_len 256, micro-batch 4 per rank, shipped ds_configs/zero3.json,
fp32), with the DeepSpeed engine wrapped to start torch.profiler (CPU activity, record_shapes and with_stack off)
at the start of step `warmup + 1` and to stop it `profile-steps` whole loop iterations later (train_step start
to train_step start: batch draw + collation, forward, loss, backward, optimizer, metrics).

Named ranges (torch.profiler.record_function) are opened around what we want to see, without editing the
library: the forward of each module family (forward pre-hooks put before DeepSpeed's, post-hooks after, so a
family's range holds its ZeRO-3 gathers, which are ranges of their own); the loss (`token_loss_sum` on the plain
path; `linear_cross_entropy_sum` on the chunked one: output-layer matmuls, cross-entropy and their gradients at the
loss positions, all inside the output layer's forward, so "backward: loss" is then only the gradient's rescale); the
backward, the engine step and the optimizer step; ZeRO-3's parameter gathers (`fetch_sub_module`), releases
(`release_sub_module`), gradient reduce-scatter (`reduce_independent_p_g_buckets_and_remove_grads`, the
epilogue), the gradient norm and the AdamW update; our metrics collectives (`dist.all_reduce_sum`), the
metrics log and the collation (`next_micro_batches`). Every profiler event's self time goes to the innermost
named range around it. Backward ops go to the module family whose forward op created their autograd node (the
profiler's sequence numbers link the two). Collective ops (gloo all_gather / reduce_scatter / all_reduce /
broadcast: time on the wire plus waiting for the other rank) are shown per range as "in collective ops"; an
asynchronous gather (ZeRO-3 prefetch) is waited for inside its range, so that wait counts in the range's own
time, not in this column. Host
syncs: `aten::_local_scalar_dense` events (`.item()`, `float(t)`, `bool(t)`), counted per range -- free on CPU,
a device-to-host wait each on a GPU. Time outside every event (Python between ranges) is "untraced".

The JSON keeps, for every range, the ops with the most self time in it (`top_ops_ms_per_step`): e.g. whether a
ZeRO-3 range's time is its copies (`aten::cat`, `aten::copy_`) or the range's own wait for a collective.

The profiler slows op-heavy code down: the table gives the profiled and the unprofiled wall time per step.
Results: bench/results/<results-name>.{json,md}. It is a measurement: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from common import OUT, REPO, machine_info, versions, write_results  # noqa: E402
from peer_throughput import WORK, cuda_available, ensure_model, free_port, select_rows, verify_rows, write_run_config  # noqa: E402

COMM_PATTERN = re.compile(r"all_gather|allgather|reduce_scatter|all_reduce|allreduce|broadcast|barrier|gloo|nccl|c10d::|record_param_comms", re.I)
SYNC_OP = "aten::_local_scalar_dense"
TOP_OPS = 8  # the ops with the most self time in each range, kept in the JSON (where a range's time goes)
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
# Rows of the table, in this order; anything else found is appended.
ORDER = (
    "collate", "forward: embedding", "forward: attention", "forward: mlp", "forward: norm", "forward: rotary",
    "forward: decoder-layer glue", "forward: backbone other (masks)", "forward: output layer (lm_head)",
    "forward: model other", "loss (cross-entropy)", "backward: embedding", "backward: attention", "backward: mlp",
    "backward: norm", "backward: rotary", "backward: decoder-layer glue", "backward: backbone other (masks)",
    "backward: output layer (lm_head)", "backward: model other", "backward: loss (cross-entropy)", "backward: unattributed",
    "ZeRO-3 gather (fetch params)", "ZeRO-3 release (re-partition)", "ZeRO-3 grad reduce-scatter", "grad norm",
    "AdamW update", "optimizer step (other)", "engine step (other)", "forward (engine, other)", "backward (engine, other)",
    "metrics collectives (all_reduce_sum)", "metrics log + progress", "train_step (other)", "untraced (Python between ranges)",
)
RANGE_LABELS = {
    "collate": "collate", "loss": "loss (cross-entropy)", "forward": "forward (engine, other)",
    "backward": "backward (engine, other)", "engine_step": "engine step (other)", "optimizer_step": "optimizer step (other)",
    "adamw": "AdamW update", "grad_norm": "grad norm", "zero3_gather": "ZeRO-3 gather (fetch params)",
    "zero3_release": "ZeRO-3 release (re-partition)", "zero3_grad_reduce": "ZeRO-3 grad reduce-scatter",
    "metrics_collective": "metrics collectives (all_reduce_sum)", "metrics_log": "metrics log + progress",
    "train_step": "train_step (other)",
}
FAMILIES = {"embedding": "embedding", "attention": "attention", "mlp": "mlp", "norm": "norm", "rotary": "rotary",
            "layer": "decoder-layer glue", "backbone": "backbone other (masks)", "lm_head": "output layer (lm_head)",
            "model": "model other"}


def family_of(name: str) -> str | None:
    """The module family of a module name in a Llama-shaped model (None: not a family of its own)."""
    leaf = name.rsplit(".", 1)[-1]
    if name == "":
        return "model"
    if leaf == "embed_tokens":
        return "embedding"
    if leaf == "self_attn":
        return "attention"
    if leaf == "mlp":
        return "mlp"
    if leaf.endswith("norm"):
        return "norm"
    if leaf == "rotary_emb":
        return "rotary"
    if leaf == "lm_head":
        return "lm_head"
    if re.search(r"layers\.\d+$", name):
        return "layer"
    if name == "model":
        return "backbone"
    return None


# ----------------------------------------------------------------------------------------------
# In the worker: named ranges without touching the library


def _ranged(function: Callable, label: str) -> Callable:
    import functools

    import torch

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(f"vt::{label}"):
            return function(*args, **kwargs)

    return wrapper


def install_ranges() -> None:
    """Named ranges around the loop's phases and DeepSpeed's ZeRO-3 work (class and module attributes, this process only)."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    import versatune_ds.dist
    import versatune_ds.engine.chunked_loss
    import versatune_ds.engine.losses
    import versatune_ds.train
    from versatune_ds.log import MetricsLogger, TrainProgress

    for owner, name, label in (
        (versatune_ds.train, "next_micro_batches", "collate"),
        # The plain path's cross-entropy over full logits, and the chunked path's (output layer + loss + their
        # gradients, all computed inside the output layer's forward at the loss positions only).
        (versatune_ds.engine.losses, "token_loss_sum", "loss"),
        (versatune_ds.engine.chunked_loss, "linear_cross_entropy_sum", "loss"),
        (versatune_ds.dist, "all_reduce_sum", "metrics_collective"),
        (MetricsLogger, "log", "metrics_log"),
        (TrainProgress, "update", "metrics_log"),
        (DeepSpeedEngine, "forward", "forward"),
        (DeepSpeedEngine, "backward", "backward"),
        (DeepSpeedEngine, "step", "engine_step"),
        (PartitionedParameterCoordinator, "fetch_sub_module", "zero3_gather"),
        (PartitionedParameterCoordinator, "release_sub_module", "zero3_release"),
        (DeepSpeedZeroOptimizer_Stage3, "reduce_independent_p_g_buckets_and_remove_grads", "zero3_grad_reduce"),
        (DeepSpeedZeroOptimizer_Stage3, "independent_gradient_partition_epilogue", "zero3_grad_reduce"),
        (DeepSpeedZeroOptimizer_Stage3, "step", "optimizer_step"),
        (DeepSpeedZeroOptimizer_Stage3, "_optimizer_step", "adamw"),
        (DeepSpeedZeroOptimizer_Stage3, "get_grad_norm_direct", "grad_norm"),
    ):
        setattr(owner, name, _ranged(getattr(owner, name), label))


def add_family_ranges(model: Any) -> int:
    """A named range around the forward of every module family; pre-hook first and post-hook last, so the
    range holds DeepSpeed's own hooks (their gathers and releases are ranges of their own)."""
    import torch

    count = 0
    for name, module in model.named_modules():
        family = family_of(name)
        if family is None:
            continue
        open_ranges: list[Any] = []

        def pre(_module: Any, _args: Any, label: str = f"vt::fwd::{family}", stack: list = open_ranges) -> None:
            handle = torch.profiler.record_function(label)
            handle.__enter__()
            stack.append(handle)

        def post(_module: Any, _args: Any, _output: Any, stack: list = open_ranges) -> None:
            stack.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(pre, prepend=True)
        module.register_forward_hook(post)
        count += 1
    return count


def attribute(events: Any, window_us: float, steps: int) -> dict:
    """Self time (ms per step), collective time and host syncs of every event, by the innermost named range."""
    main_thread = next((e.thread for e in events if e.name.startswith("vt::")), None)
    events = [e for e in events if e.thread == main_thread]
    label_of: dict[int, str] = {}
    seq_family: dict[int, str] = {}

    def own_label(event: Any) -> str | None:
        name = event.name
        if name.startswith("vt::fwd::"):
            return "forward: " + FAMILIES[name[len("vt::fwd::"):]]
        if name.startswith("vt::"):
            return RANGE_LABELS.get(name[4:], name[4:])
        if name.startswith(BACKWARD_PREFIX):
            family = seq_family.get(event.sequence_nr)
            return f"backward: {family}" if family else "backward: unattributed"
        return None

    # Parents before children: events sorted by start time, a parent starts no later than its child.
    ordered = sorted(events, key=lambda e: (e.time_range.start, -e.time_range.end))
    for event in ordered:
        parent = event.cpu_parent
        inherited = label_of.get(id(parent)) if parent is not None else None
        label = own_label(event) or inherited or "outside named ranges"
        label_of[id(event)] = label
        if event.sequence_nr >= 0 and not event.name.startswith(BACKWARD_PREFIX) and label.startswith(("forward: ", "loss")):
            seq_family.setdefault(event.sequence_nr, label.split(": ", 1)[1] if label.startswith("forward: ") else "loss (cross-entropy)")
    self_us: dict[str, float] = defaultdict(float)
    comm_us: dict[str, float] = defaultdict(float)
    syncs: dict[str, int] = defaultdict(int)
    op_us: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    comm_root: dict[int, bool] = {}
    for event in ordered:
        label = label_of[id(event)]
        self_us[label] += event.self_cpu_time_total
        op_us[label][event.name] += event.self_cpu_time_total
        parent = event.cpu_parent
        in_comm = bool(COMM_PATTERN.search(event.name)) or (parent is not None and comm_root.get(id(parent), False))
        comm_root[id(event)] = in_comm
        if in_comm:
            comm_us[label] += event.self_cpu_time_total
        if event.name == SYNC_OP:
            syncs[label] += 1
    covered = sum(e.cpu_time_total for e in ordered if e.cpu_parent is None)
    self_us["untraced (Python between ranges)"] += max(0.0, window_us - covered)
    names = [n for n in ORDER if n in self_us] + sorted(n for n in self_us if n not in ORDER)
    total = sum(self_us.values())
    return {
        "rows": [{"what": n, "ms_per_step": self_us[n] / 1e3 / steps, "share": self_us[n] / total if total else 0.0,
                  "comm_ms_per_step": comm_us[n] / 1e3 / steps, "host_syncs_per_step": syncs[n] / steps,
                  "top_ops_ms_per_step": {op: us / 1e3 / steps for op, us in sorted(op_us[n].items(), key=lambda kv: -kv[1])[:TOP_OPS]}}
                 for n in names],
        "total_ms_per_step": total / 1e3 / steps, "events": len(events),
    }


class ProfilingEngine:
    """Our DeepSpeed engine, unchanged; profiles loop iterations [warmup, warmup + profile_steps) and then stops."""

    def __init__(self, inner: Any, spec: dict, rank: int, world_size: int) -> None:
        self.inner, self.spec, self.rank, self.world_size = inner, spec, rank, world_size
        self.begins: list[float] = []
        self.profiler: Any = None
        self.families = add_family_ranges(inner.module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def train_step(self, micro_batches: Any) -> Any:
        import torch

        warmup, steps = int(self.spec["warmup"]), int(self.spec["profile_steps"])
        self.begins.append(time.perf_counter())
        calls = len(self.begins)
        if calls == warmup + 1:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False, with_stack=False)
            self.profiler.__enter__()
            self.window_start = time.perf_counter()
        elif calls == warmup + steps + 1:
            window_s = time.perf_counter() - self.window_start
            self.profiler.__exit__(None, None, None)
            self.report(window_s)
        with torch.profiler.record_function("vt::train_step"):
            return self.inner.train_step(micro_batches)

    def report(self, window_s: float) -> None:
        from peer_workers import finish

        warmup, steps = int(self.spec["warmup"]), int(self.spec["profile_steps"])
        if self.spec.get("trace") and self.rank == 0:
            self.profiler.export_chrome_trace(str(Path(self.spec["out_dir"]) / "trace_rank0.json"))
        table = attribute(self.profiler.events(), window_s * 1e6, steps)
        unprofiled = [b - a for a, b in zip(self.begins[1:warmup], self.begins[2 : warmup + 1])]
        finish(self.spec, self.rank, self.world_size, {
            "pipeline": "ours (profiled)", "profiled_wall_s_per_step": window_s / steps,
            "unprofiled_wall_s_per_step": statistics.median(unprofiled) if unprofiled else None,
            "module_families_hooked": self.families, **table,
        })


def worker(spec_path: str) -> None:
    import logging
    import warnings

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    warnings.filterwarnings("ignore")
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr)
    from versatune_ds import dist
    from versatune_ds.config.loading import load_config
    from versatune_ds.train import deepspeed_engine, run_training

    install_ranges()
    env = dist.DistEnv.from_environ()
    max_steps = int(spec["warmup"]) + int(spec["profile_steps"]) + 1
    cfg = load_config(spec["config"], [f"train.run_dir={spec['run_dir']}", f"train.max_steps={max_steps}"])
    run_training(cfg, resume="none",
                 engine_factory=lambda run_cfg, ds: ProfilingEngine(deepspeed_engine(run_cfg, ds), spec, env.rank, env.world_size))
    raise RuntimeError("the run ended before the profile window closed")


# ----------------------------------------------------------------------------------------------
# The driver


def profile_model(name: str, args: argparse.Namespace) -> dict:
    model_dir = ensure_model(name, args)
    rows = WORK / name / "rows"
    selection = select_rows(model_dir, Path(args.data_dir), args.seq_len, rows, args.max_rows_per_domain)
    config = write_run_config(WORK / name / "ours.yaml", model_dir, rows, args)
    verify_rows(config, selection)
    run_dir = OUT / "profile_step" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    spec = {"config": str(config), "run_dir": str(run_dir / "run"), "out_dir": str(run_dir), "warmup": args.warmup,
            "profile_steps": args.profile_steps, "trace": args.trace}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'bench'}", "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    if not cuda_available():
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator (gloo), without its warning
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(Path(__file__).resolve()), "--worker", str(run_dir / "spec.json")]
    with open(run_dir / "log.txt", "w", encoding="utf-8") as log:
        code = subprocess.run(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout_s).returncode
    files = [run_dir / f"rank{r}.json" for r in range(2)]
    if not all(f.is_file() for f in files):
        tail = "\n".join((run_dir / "log.txt").read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"profile of {name} failed (exit {code}); log {run_dir / 'log.txt'}:\n{tail}")
    ranks = [json.loads(f.read_text()) for f in files]
    shutil.rmtree(run_dir / "run", ignore_errors=True)
    return {"model_dir": str(model_dir), "exit_code": code, "ranks": ranks, "load_avg_after": os.getloadavg()[0]}


def markdown(results: dict) -> str:
    s = results["setup"]
    lines = ["# Where a training step goes: our loop under ZeRO-3, profiled", "",
             f"`run_training` on 2 ranks x {s['threads_per_rank']} thread(s), gloo, {s['dtype']}, DeepSpeed `{s['ds_config']}`, "
             f"seq_len {s['seq_len']}, micro-batch {s['micro_batch_size']} per rank (the rows of peer_throughput); torch.profiler "
             f"over {s['profile_steps']} loop iteration(s) after {s['warmup']} untimed ones. Self time of every event by the "
             "innermost named range (see bench/profile_step.py); backward ops by the module family whose forward made them. "
             "'in collective ops' = self time of synchronous collective ops (transfer + waiting for the other rank; an async "
             "gather's wait counts in its range's own time); 'syncs' = `.item()`-style host syncs.", ""]
    for name, model in results["models"].items():
        r0, r1 = model["ranks"][0], model["ranks"][1]
        unprof = r0["unprofiled_wall_s_per_step"]
        lines += [f"## {name} (`{model['model_dir']}`)", "",
                  f"Rank 0: {r0['total_ms_per_step']:.1f} ms per step profiled (wall {1e3 * r0['profiled_wall_s_per_step']:.1f} ms; "
                  f"{'%.1f ms' % (1e3 * unprof) if unprof else 'n/a'} without the profiler); rank 1: {r1['total_ms_per_step']:.1f} ms. "
                  f"{r0['events']} events per rank.", "",
                  "| where | ms / step (rank 0) | share | in collective ops (ms) | host syncs / step | ms / step (rank 1) |",
                  "|---|---|---|---|---|---|"]
        other = {row["what"]: row for row in r1["rows"]}
        for row in r0["rows"]:
            peer = other.get(row["what"], {}).get("ms_per_step", 0.0)
            lines.append(f"| {row['what']} | {row['ms_per_step']:.1f} | {100 * row['share']:.1f} % | {row['comm_ms_per_step']:.1f} | "
                         f"{row['host_syncs_per_step']:.0f} | {peer:.1f} |")
        lines.append("")
    loads = ", ".join(f"{m['load_avg_after']:.1f}" for m in results["models"].values())
    lines += [f"Load average (1 min) after the runs: {loads}; "
              f"machine: {results['machine']['nproc']} CPUs. Versions: {json.dumps(results['versions'])}.", "",
              f"Command: `{results['command']}`"]
    if results.get("note"):
        lines += ["", results["note"]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--warmup", type=int, default=3, help="loop iterations before the profile (>= 2: the unprofiled reference)")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--ds-config", default="zero3")
    parser.add_argument("--max-rows-per-domain", type=int, default=None)
    parser.add_argument("--data-dir", default=None, help="default: as bench/peer_throughput.py")
    parser.add_argument("--tiny-dir", default=str(REPO / "runs" / "tiny-model"))
    parser.add_argument("--smollm2-dir", default=str(REPO / "runs" / "smollm2"))
    parser.add_argument("--trace", action="store_true", help="also write rank 0's Chrome trace to bench/out/profile_step/<model>/")
    parser.add_argument("--timeout-s", type=int, default=3600)
    parser.add_argument("--results-name", default="profile_step")
    parser.add_argument("--note", default="")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return 0
    if args.warmup < 2 or args.profile_steps < 1:
        raise SystemExit("--warmup must be >= 2 and --profile-steps >= 1")
    if args.data_dir is None:
        from common import DATA

        args.data_dir = str(DATA / "sft" if (DATA / "sft").is_dir() else REPO / "data" / "sample")
    results: dict = {"setup": {k: getattr(args, k) for k in ("warmup", "profile_steps", "seq_len", "micro_batch_size", "dtype",
                                                            "ds_config", "data_dir", "max_rows_per_domain")} | {"threads_per_rank": args.threads},
                     "models": {}, "command": "python bench/profile_step.py " + " ".join(sys.argv[1:]), "note": args.note}
    for name in args.models:
        results["models"][name] = profile_model(name, args)
        r0 = results["models"][name]["ranks"][0]
        print(f"{name}: {r0['total_ms_per_step']:.1f} ms per step profiled on rank 0", flush=True)
    results["machine"] = machine_info()
    results["versions"] = versions()
    text = markdown(results)
    write_results(args.results_name, results, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
