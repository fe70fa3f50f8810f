"""Cost of the MixtureSampler (exact EDF apportionment, mixture/apportion.py): time and peak memory per draw.

    PYTHONPATH=. .venv/bin/python bench/sampler_cost.py [--num-samples 10000000] [--token-samples 1000000]

(PYTHONPATH=. only while the package is not pip-installed.) Timings need a quiet machine.

Writes bench/results/sampler_cost.json and bench/results/sampler_cost.md. Modes (6 domains x 2000 rows,
block 1024):
  batches           unit items, next_batch() with global batch 1024 on 1 rank (the training loop's path)
  batches_dominant  as `batches` with generic weights and a dominant domain (0.57, 0.23, ...): the closed forms do
                    not apply to every segment, so those fall back to the position-by-position heap
  rank0_of_8        next_batch() on rank 0 of 8 (each call computes the 1024-row global batch, reads 128)
  batches_stages    as `batches`, with set_weights() every 100 batches (about 100 stages at 10M samples)
  chunks            global_items() in chunks of 1,000,000 rows
  tokens            unit tokens (rows of 64-1024 tokens), next_batch() with global batch 1024 (--token-samples)
  small_items / small_tokens  next_batch() with global batch 16: the per-call cost of a small training batch
Peak Python-heap memory is measured by tracemalloc (numpy reports its buffers to it) in a second,
separate pass, because tracemalloc slows the timed pass; maxrss is the whole process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
import tracemalloc
from pathlib import Path

import numpy as np
from common import write_results  # noqa: E402

from versatune_ds.mixture.sampler import MixtureSampler, MixtureSchedule

DOMAIN_SIZES = [2000] * 6
WEIGHTS = [0.30, 0.25, 0.15, 0.12, 0.10, 0.08]
DOMINANT = [0.57, 0.23, 0.12, 0.05, 0.03, 0.004]  # sends every segment to the heap fallback (checked)
BLOCK_SIZE = 1024
GLOBAL_BATCH_SIZE = 1024
SMALL_BATCH = 16
CHUNK = 1_000_000
MODES = ("batches", "batches_dominant", "rank0_of_8", "batches_stages", "chunks", "tokens", "small_items", "small_tokens")


def make_sampler(mode: str) -> MixtureSampler:
    tokens = mode in ("tokens", "small_tokens")
    rng = np.random.default_rng(0)
    return MixtureSampler(
        DOMAIN_SIZES,
        seed=0,
        block_size=BLOCK_SIZE,
        global_batch_size=SMALL_BATCH if mode.startswith("small") else GLOBAL_BATCH_SIZE,
        rank=0,
        world_size=8 if mode == "rank0_of_8" else 1,
        schedule=MixtureSchedule.constant(DOMINANT if mode == "batches_dominant" else WEIGHTS),
        unit="tokens" if tokens else "items",
        row_sizes=[rng.integers(64, 1025, size) for size in DOMAIN_SIZES] if tokens else None,
    )


def draw(mode: str, num_samples: int) -> tuple[int, int]:
    """Walk through `num_samples` global samples in `mode`; (calls, checksum) so nothing is optimised away."""
    checksum = calls = 0
    sampler = make_sampler(mode)
    if mode == "chunks":
        for start in range(0, num_samples, CHUNK):
            rows = sampler.global_items(start, min(CHUNK, num_samples - start))
            checksum += int(rows[-1, 1])
            calls += 1
        return calls, checksum
    rng = np.random.default_rng(0)
    while sampler.consumed_samples < num_samples:
        if mode == "batches_stages" and calls % 100 == 99:
            sampler.set_weights(rng.dirichlet(np.ones(len(DOMAIN_SIZES))))
        rows = sampler.next_batch()
        checksum += int(rows[-1, 1])
        calls += 1
    return calls, checksum


def samples_for(mode: str, args: argparse.Namespace) -> int:
    if mode == "tokens":
        return args.token_samples
    if mode.startswith("small"):
        return args.small_samples
    return args.num_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=10_000_000)
    parser.add_argument("--token-samples", type=int, default=1_000_000)
    parser.add_argument("--small-samples", type=int, default=160_000, help="samples for the global-batch-16 modes")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    results = []
    load_start = [round(x, 2) for x in os.getloadavg()]
    for mode in MODES:
        num_samples = samples_for(mode, args)
        start = time.perf_counter()
        calls, _ = draw(mode, num_samples)
        seconds = time.perf_counter() - start
        tracemalloc.start()
        draw(mode, min(num_samples, 2_000_000))  # the peak does not grow with the sample count
        peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        row = {
            "mode": mode,
            "num_samples": num_samples,
            "seconds": round(seconds, 3),
            "samples_per_second": round(num_samples / seconds),
            "ms_per_call": round(seconds / calls * 1000, 3),
            "tracemalloc_peak_mib": round(peak_bytes / 2**20, 2),
        }
        results.append(row)
        print(json.dumps(row))

    maxrss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    command = (f"PYTHONPATH=. .venv/bin/python bench/sampler_cost.py --num-samples {args.num_samples} "
               f"--token-samples {args.token_samples} --small-samples {args.small_samples}")
    report = {
        "command": command,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "load_avg": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
        "setup": {"domain_sizes": DOMAIN_SIZES, "weights": WEIGHTS, "dominant_weights": DOMINANT, "block_size": BLOCK_SIZE,
                  "global_batch_size": GLOBAL_BATCH_SIZE, "small_batch": SMALL_BATCH, "chunk": CHUNK,
                  "token_rows": "64-1024 tokens, uniform"},
        "results": results,
        "maxrss_mib": round(maxrss_mib, 1),
    }
    lines = [
        "# Sampler cost",
        "",
        f"`{command}` (python {report['python']}, numpy {report['numpy']}, {report['machine']}; load average "
        f"{report['load_avg']['start']} at the start, {report['load_avg']['end']} at the end).",
        f"6 domains x 2000 rows, block {BLOCK_SIZE}, global batch {GLOBAL_BATCH_SIZE} ({SMALL_BATCH} for the small_* modes). "
        "'samples' counts global samples consumed (rank0_of_8 reads 1/8 of them, but computes every batch: the state after a "
        "batch depends on all its rows); batches_stages adds a weight change every 100 batches; batches_dominant weights "
        f"{DOMINANT} (the heap fallback); tokens: unit tokens, rows of 64-1024 tokens.",
        "",
        "| mode | samples | seconds | samples/s | ms per call | tracemalloc peak (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in results:
        lines.append(
            f"| {row['mode']} | {row['num_samples']:,} | {row['seconds']} | {row['samples_per_second']:,} "
            f"| {row['ms_per_call']} | {row['tracemalloc_peak_mib']} |"
        )
    lines += ["", f"Process maxrss: {report['maxrss_mib']} MiB.", ""]
    write_results("sampler_cost", report, "\n".join(lines), folder=args.out)
    print(f"maxrss_mib {report['maxrss_mib']}")


if __name__ == "__main__":
    main()
