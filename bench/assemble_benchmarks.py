"""Re-assemble BENCHMARKS.md: keep its hand-written top (everything before "## Contents") and re-include every
bench/results/*.md below it (headings demoted two levels, PNG links pointed at bench/results/).

    python bench/assemble_benchmarks.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TARGET = REPO / "BENCHMARKS.md"
ORDER = ("quality_smollm2", "quality_smollm2_24steps", "tiny_base", "forgetting_regime", "quality_tiny", "expansion", "expansion_noramp", "expansion_300steps", "cost", "peer_throughput", "peer_throughput_persist_layers", "profile_compare", "profile_step", "gloo_bandwidth", "train_throughput", "gpu_throughput",
         "eval_speed", "probe_fidelity", "probe_fidelity_cpu12000", "probe_fidelity_gpu", "probe_fidelity_zeroshot", "classifier_accuracy", "classifier_accuracy_zeroshot", "classifier_zeroshot", "classifier_hidden_states", "data_throughput", "sampler_cost")


def anchor(name: str) -> str:
    return name.replace("_", "-")


def main() -> int:
    top = TARGET.read_text(encoding="utf-8").split("## Contents", 1)[0].rstrip() + "\n"
    names = [n for n in ORDER if (RESULTS / f"{n}.md").is_file()]
    names += sorted(p.stem for p in RESULTS.glob("*.md") if p.stem not in ORDER)
    parts = [top, "## Contents\n\n" + "\n".join(f"- [{n}](#{anchor(n)}) — `bench/results/{n}.md`" for n in names) + "\n"]
    for name in names:
        text = (RESULTS / f"{name}.md").read_text(encoding="utf-8")
        text = re.sub(r"^(#+) ", lambda m: "#" * min(len(m.group(1)) + 2, 6) + " ", text, flags=re.M)
        text = re.sub(r"\]\((?!http)(?:bench/results/)?([^)/]+\.png)\)", r"](bench/results/\1)", text)
        parts.append(f'<a id="{anchor(name)}"></a>\n\n## {name}\n\nSource: `bench/results/{name}.md` '
                     f"(numbers: `bench/results/{name}.json`).\n\n" + text.rstrip() + "\n")
    TARGET.write_text("\n".join(parts), encoding="utf-8")
    print(f"{TARGET}: {len(names)} result sections")
    return 0


if __name__ == "__main__":
    sys.exit(main())
