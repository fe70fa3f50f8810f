"""Cost of the MixtureSampler: seconds and peak memory to draw 10 million samples.

    PYTHONPATH=. .venv/bin/python bench/sampler_cost.py [--num-samples 10000000]

(PYTHONPATH=. only while the package is not pip-installed.)

Writes bench/results/sampler_cost.json and bench/results/sampler_cost.md.
Modes:
  batches        next_batch() with global batch 1024 on 1 rank (the training loop's path)
  rank0_of_8     next_batch() on rank 0 of 8 (each call reads 128 rows of a 1024-row global batch)
  batches_stages as `batches`, with set_weights() every 100 batches (about 100 stages at 10M samples)
  chunks         global_items() in chunks of 1,000,000 rows
Peak Python-heap memory is measured by tracemalloc (numpy reports its buffers to it) in a second,
separate pass, because tracemalloc slows the timed pass; maxrss is the whole process.
"""

from __future__ import annotations

import argparse
import json
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
BLOCK_SIZE = 1024
GLOBAL_BATCH_SIZE = 1024
CHUNK = 1_000_000


def make_sampler(rank: int = 0, world_size: int = 1) -> MixtureSampler:
    return MixtureSampler(
        DOMAIN_SIZES,
        seed=0,
        block_size=BLOCK_SIZE,
        global_batch_size=GLOBAL_BATCH_SIZE,
        rank=rank,
        world_size=world_size,
        schedule=MixtureSchedule.constant(WEIGHTS),
    )


def draw(mode: str, num_samples: int) -> int:
    """Walk through `num_samples` global samples in `mode`; returns a checksum so nothing is optimised away."""
    checksum = 0
    if mode == "chunks":
        sampler = make_sampler()
        for start in range(0, num_samples, CHUNK):
            rows = sampler.global_items(start, min(CHUNK, num_samples - start))
            checksum += int(rows[-1, 1])
        return checksum
    sampler = make_sampler(world_size=8) if mode == "rank0_of_8" else make_sampler()
    rng = np.random.default_rng(0)
    step = 0
    while sampler.consumed_samples < num_samples:
        if mode == "batches_stages" and step % 100 == 99:
            sampler.set_weights(rng.dirichlet(np.ones(len(DOMAIN_SIZES))))
        rows = sampler.next_batch()
        checksum += int(rows[-1, 1])
        step += 1
    return checksum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=10_000_000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    results = []
    for mode in ("batches", "rank0_of_8", "batches_stages", "chunks"):
        start = time.perf_counter()
        draw(mode, args.num_samples)
        seconds = time.perf_counter() - start
        tracemalloc.start()
        draw(mode, min(args.num_samples, 2_000_000))  # the peak does not grow with the sample count
        peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        row = {
            "mode": mode,
            "num_samples": args.num_samples,
            "seconds": round(seconds, 3),
            "samples_per_second": round(args.num_samples / seconds),
            "tracemalloc_peak_mib": round(peak_bytes / 2**20, 2),
        }
        results.append(row)
        print(json.dumps(row))

    maxrss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    report = {
        "command": f"PYTHONPATH=. .venv/bin/python bench/sampler_cost.py --num-samples {args.num_samples}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "setup": {
            "domain_sizes": DOMAIN_SIZES,
            "weights": WEIGHTS,
            "block_size": BLOCK_SIZE,
            "global_batch_size": GLOBAL_BATCH_SIZE,
            "chunk": CHUNK,
        },
        "results": results,
        "maxrss_mib": round(maxrss_mib, 1),
    }
    lines = [
        "# Sampler cost",
        "",
        f"`{report['command']}` (python {report['python']}, numpy {report['numpy']}, {report['machine']}).",
        f"6 domains x 2000 items, block {BLOCK_SIZE}, global batch {GLOBAL_BATCH_SIZE}. 'samples' counts global",
        "samples consumed (rank0_of_8 reads 1/8 of them); batches_stages adds a weight change every 100 batches.",
        "",
        "| mode | samples | seconds | samples/s | tracemalloc peak (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in results:
        lines.append(
            f"| {row['mode']} | {row['num_samples']:,} | {row['seconds']} | {row['samples_per_second']:,} "
            f"| {row['tracemalloc_peak_mib']} |"
        )
    lines += ["", f"Process maxrss: {report['maxrss_mib']} MiB.", ""]
    write_results("sampler_cost", report, "\n".join(lines), folder=args.out)
    print(f"maxrss_mib {report['maxrss_mib']}")


if __name__ == "__main__":
    main()
