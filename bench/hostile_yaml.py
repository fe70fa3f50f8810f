"""Cost of reading hostile run configs: the bounded loader vs PyYAML alone.

    PYTHONPATH=. .venv/bin/python bench/hostile_yaml.py [--quick]

For each document: `load_config` (versatune_ds.config, with its bounds) -- wall seconds, tracemalloc peak,
and what it answered -- and, for comparison, plain `yaml.safe_load` followed by a walk of the expanded value
(what any code that visits the config does, e.g. the typed conversion), in a child process capped at 2 GiB
of address space and 60 s. `--quick` uses small variants (a smoke test of the script).

Writes bench/results/hostile_yaml.json and bench/results/hostile_yaml.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
from pathlib import Path

from common import machine_info, versions, write_results  # noqa: E402

from versatune_ds.config.loading import load_config
from versatune_ds.errors import UserError

CAP_BYTES = 2 << 30
CAP_SECONDS = 60


def billion_laughs(levels: int, fan_out: int = 10) -> str:
    lines = ["model: {path: m}", 'l0: &l0 ["lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan_out)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def documents(quick: bool) -> dict[str, str]:
    n = 10 if quick else 1
    return {
        "billion laughs, 6 levels (10^6 values)": billion_laughs(6),
        "billion laughs, 9 levels (10^9 values)": billion_laughs(5 if quick else 9),
        "nested flow lists, depth 100 000": "model: " + "[" * (100_000 // n) + "]" * (100_000 // n) + "\n",
        "nested block mappings, depth 2 000": "".join("  " * i + f"k{i}:\n" for i in range(2000 // n)) + "x: 1\n",
        "alias chain, 1 000 anchors": "x0: &x0 [1]\n" + "".join(f"x{i}: &x{i} [*x{i - 1}]\n" for i in range(1, 1000 // n)),
        "250 KiB of keys": "".join(f"k{i}: {i}\n" for i in range(25_000 // n)),
    }


def bounded(text: str, folder: Path) -> dict:
    path = folder / "run.yaml"
    path.write_text(text, encoding="utf-8")
    tracemalloc.start()
    started = time.perf_counter()
    try:
        load_config(path)
        outcome = "loaded"
    except UserError as exc:
        outcome = str(exc).replace(str(path), "run.yaml").splitlines()[0][:110]
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"seconds": round(seconds, 4), "peak_mib": round(peak / 2**20, 2), "outcome": outcome}


UNBOUNDED = textwrap.dedent(
    """
    import resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
    import yaml

    def walk(value):
        if isinstance(value, dict):
            return 1 + sum(walk(k) + walk(v) for k, v in value.items())
        if isinstance(value, list):
            return 1 + sum(walk(v) for v in value)
        return 1

    started = time.perf_counter()
    try:
        print("values", walk(yaml.safe_load(open(sys.argv[1]).read())), "in", round(time.perf_counter() - started, 3), "s")
    except BaseException as exc:
        print(type(exc).__name__, "after", round(time.perf_counter() - started, 1), "s")
    """
)


def unbounded(text: str, folder: Path) -> str:
    path = folder / "plain.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        done = subprocess.run([sys.executable, "-c", UNBOUNDED.format(cap=CAP_BYTES), str(path)], capture_output=True,
                              text=True, timeout=CAP_SECONDS)
    except subprocess.TimeoutExpired:
        return f"still running after {CAP_SECONDS} s (killed)"
    return (done.stdout.strip() or done.stderr.strip().splitlines()[-1])[:90]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, text in documents(args.quick).items():
            row = {"document": name, "characters": len(text), **bounded(text, folder), "pyyaml_alone": unbounded(text, folder)}
            print(json.dumps(row))
            rows.append(row)
    document = {"rows": rows, "quick": args.quick, "machine": machine_info(), "versions": versions()}
    lines = [
        "# Hostile run configs",
        "",
        f"`PYTHONPATH=. .venv/bin/python bench/hostile_yaml.py{' --quick' if args.quick else ''}` "
        f"(load average at the end: {document['machine']['load_avg_at_end']}).",
        "`load_config` with its bounds (256 KiB, 64 levels, 100 000 values after alias expansion) against PyYAML's",
        f"`safe_load` + one walk of the value, capped at {CAP_BYTES >> 30} GiB and {CAP_SECONDS} s. Peak = tracemalloc.",
        "",
        "| document | characters | load_config s | peak MiB | load_config says | PyYAML alone |",
        "|---|---:|---:|---:|---|---|",
    ]
    lines += [f"| {r['document']} | {r['characters']:,} | {r['seconds']} | {r['peak_mib']} | {r['outcome']} | {r['pyyaml_alone']} |"
              for r in rows]
    write_results("hostile_yaml", document, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
