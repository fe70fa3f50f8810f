"""The measuring parts of bench/peer_throughput.py and bench/profile_step.py (no timing is asserted anywhere).

- the row selection every pipeline shares keeps only rows that fit seq_len whole, with a loss token, and our data
  pipeline reads exactly those examples and tokens back from the files written for it;
- tokens/s are taken over whole loop iterations [warmup, steps), per-rank counts summed step by step;
- the profile attribution gives every event's self time to the innermost named range, and a backward op to the
  module family whose forward op created its autograd node.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import peer_throughput  # noqa: E402
import profile_step  # noqa: E402

SAMPLE = REPO / "data" / "sample"


def test_row_selection_keeps_whole_rows_and_our_pipeline_reads_them_back(tiny_model_dir: Path, tmp_path: Path) -> None:
    seq_len = 160  # short enough that some sample rows do not fit
    rows = tmp_path / "rows"
    selection = peer_throughput.select_rows(tiny_model_dir, SAMPLE, seq_len, rows, max_per_domain=None)
    per_domain = selection["per_domain"]
    assert sum(d["dropped_too_long"] for d in per_domain.values()) > 0
    tokenized = [json.loads(line) for line in (rows / "tokenized.jsonl").read_text().splitlines()]
    assert len(tokenized) == sum(d["train_rows"] for d in per_domain.values())
    for row in tokenized:
        assert len(row["input_ids"]) == len(row["labels"]) <= seq_len
        assert any(label != -100 for label in row["labels"])  # an answer, whole
    for domain, counts in per_domain.items():
        assert len((rows / "train" / f"{domain}.jsonl").read_text().splitlines()) == counts["train_rows"]
        assert len((rows / "heldout" / f"{domain}.jsonl").read_text().splitlines()) == counts["heldout_rows"] == 2
        assert counts["train_tokens"] == sum(len(r["input_ids"]) for r in tokenized if r["domain"] == domain)
    args = argparse.Namespace(dtype="fp32", seq_len=seq_len, micro_batch_size=2, ds_config="zero3")
    config = peer_throughput.write_run_config(tmp_path / "ours.yaml", tiny_model_dir, rows, args, cache_dir=tmp_path / "cache")
    peer_throughput.verify_rows(config, selection)  # raises SystemExit on any difference
    broken = json.loads(json.dumps(selection))
    broken["per_domain"]["law"]["train_tokens"] += 1
    with pytest.raises(SystemExit, match="domain law"):
        peer_throughput.verify_rows(config, broken)
    with pytest.raises(SystemExit, match="raise --seq-len"):
        peer_throughput.select_rows(tiny_model_dir, SAMPLE, 8, tmp_path / "too_short", max_per_domain=None)


def test_throughput_is_taken_over_whole_iterations_and_per_rank_counts_are_summed() -> None:
    records = [
        {"rank": 1, "pipeline": "p", "begins": [9, 9, 9, 9, 9], "counts_are_global": False, "peak_rss_mib": 20.0,
         "nonpad_tokens": [100, 10, 20, 30], "loss_tokens": [50, 1, 2, 3]},
        {"rank": 0, "pipeline": "p", "begins": [0.0, 5.0, 6.0, 8.0, 11.0], "counts_are_global": False, "peak_rss_mib": 10.0,
         "nonpad_tokens": [100, 40, 50, 60], "loss_tokens": [50, 4, 5, 6]},
    ]
    result = peer_throughput.measure(records, warmup=1, steps=4)
    assert result["seconds"] == 6.0  # start of step 1 to start of step 4, rank 0's clock
    assert result["nonpad_tokens"] == 10 + 20 + 30 + 40 + 50 + 60
    assert result["loss_tokens"] == 1 + 2 + 3 + 4 + 5 + 6
    assert result["nonpad_tokens_per_s"] == pytest.approx(210 / 6)
    assert result["peak_rss_mib_per_rank"] == [10.0, 20.0]
    summary = peer_throughput.summarize({"ours": [result], "hf_trainer": [{**result, "nonpad_tokens_per_s": 70.0}]})
    assert summary["ratio_nonpad_tokens_per_s"] == {"fastest_peer": "hf_trainer", "ours_over_fastest": pytest.approx(0.5)}


def test_module_families_of_a_llama() -> None:
    assert profile_step.family_of("") == "model"
    assert profile_step.family_of("model") == "backbone"
    assert profile_step.family_of("model.embed_tokens") == "embedding"
    assert profile_step.family_of("model.layers.3") == "layer"
    assert profile_step.family_of("model.layers.3.self_attn") == "attention"
    assert profile_step.family_of("model.layers.3.self_attn.q_proj") is None  # inside its family's range
    assert profile_step.family_of("model.layers.3.mlp") == "mlp"
    assert profile_step.family_of("model.layers.3.input_layernorm") == "norm"
    assert profile_step.family_of("model.norm") == "norm"
    assert profile_step.family_of("lm_head") == "lm_head"


def test_profile_attribution_follows_ranges_and_autograd_links() -> None:
    first, second = torch.nn.Linear(32, 32), torch.nn.Linear(32, 1)
    x = torch.randn(16, 32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("vt::fwd::mlp"):
            hidden = torch.relu(first(x))
        with torch.profiler.record_function("vt::fwd::attention"):
            out = second(hidden).sum()
        with torch.profiler.record_function("vt::backward"):
            out.backward()
    events = prof.events()
    window_us = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
    table = profile_step.attribute(events, window_us, steps=1)
    rows = {row["what"]: row for row in table["rows"]}
    for what in ("forward: mlp", "forward: attention", "backward: mlp", "backward: attention", "backward (engine, other)"):
        assert rows[what]["ms_per_step"] > 0, what
    assert sum(row["share"] for row in table["rows"]) == pytest.approx(1.0)
    # every event's self time is counted once: the rows add up to the events' time plus the untraced gap
    assert table["total_ms_per_step"] == pytest.approx(window_us / 1e3, rel=1e-6)
