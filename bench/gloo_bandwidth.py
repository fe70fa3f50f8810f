"""What ZeRO-3's collectives cost on the CPU test machines: gloo all_gather / reduce_scatter / all_reduce, 2 ranks.

    python bench/gloo_bandwidth.py [--sizes-mib 16 64 256] [--repeats 3]

ZeRO-3 gathers every parameter shard before it is used and reduce-scatters every gradient: per optimizer step
about 1.5-2x the model's bytes through all_gather and 1x through reduce_scatter. Both peers and our loop pay it
alike (bench/peer_throughput.py gives every pipeline the same DeepSpeed dict), so this is the floor under the
step that no loop-level change moves. Each size is timed as the median of `--repeats` calls after a barrier, on
rank 0. Writes bench/results/gloo_bandwidth.{json,md}. A measurement: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, machine_info, versions, write_results

OPS = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce")


def worker(sizes_mib: list[int], repeats: int, out: Path) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for mib in sizes_mib:
        numel = mib * 2**20 // 4 // world * world  # fp32 elements of the full (gathered) tensor
        full, shard = torch.randn(numel), torch.randn(numel // world)
        calls = {
            "all_gather_into_tensor": lambda: dist.all_gather_into_tensor(full, shard),
            "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(shard, full),
            "all_reduce": lambda: dist.all_reduce(full),
        }
        for op in OPS:
            seconds = []
            for _ in range(repeats + 1):  # the first call is a warm-up
                dist.barrier()
                started = time.perf_counter()
                try:
                    calls[op]()
                except (RuntimeError, NotImplementedError) as error:  # an op this torch's gloo lacks: say so
                    if rank == 0:
                        print(f"{op}: {error}".splitlines()[0], file=sys.stderr)
                    seconds = []
                    break
                seconds.append(time.perf_counter() - started)
            if not seconds:
                rows.append({"op": op, "mib": mib, "ms": None, "gib_per_s": None})
                continue
            median = statistics.median(seconds[1:])
            rows.append({"op": op, "mib": mib, "ms": round(median * 1e3, 1), "gib_per_s": round(mib / 1024 / median, 3)})
    if rank == 0:
        out.write_text(json.dumps(rows), encoding="utf-8")
    dist.destroy_process_group()


def markdown(result: dict) -> str:
    lines = ["# gloo collectives on this machine (2 ranks, 1 thread each)", "",
             "Median time per call of the full tensor's size (MiB); GiB/s = that size over the time.", "",
             "| op | " + " | ".join(f"{m} MiB" for m in result["sizes_mib"]) + " |", "|---|" + "---|" * len(result["sizes_mib"])]
    for op in OPS:
        found = [next(r for r in result["rows"] if r["op"] == op and r["mib"] == m) for m in result["sizes_mib"]]
        cells = [f"{r['ms']:.0f} ms ({r['gib_per_s']:.2f} GiB/s)" if r["ms"] is not None else "not in this gloo" for r in found]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines += ["", f"Load average at the end: {result['machine'].get('load_avg_at_end')}; versions: {json.dumps(result['versions'])}.", "",
              f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out is not None:
        worker(args.sizes_mib, args.repeats, args.worker_out)
        return 0
    out = REPO / "bench" / "out" / "gloo_bandwidth.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(Path(__file__).resolve()),
           "--sizes-mib", *map(str, args.sizes_mib), "--repeats", str(args.repeats), "--worker-out", str(out)]
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    result = {"sizes_mib": args.sizes_mib, "repeats": args.repeats, "rows": json.loads(out.read_text(encoding="utf-8")),
              "command": "python bench/gloo_bandwidth.py " + " ".join(sys.argv[1:]), "machine": machine_info(), "versions": versions()}
    write_results("gloo_bandwidth", result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
