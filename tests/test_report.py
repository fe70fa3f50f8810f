"""`report` on a synthetic run directory: PNGs and a summary that covers every domain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from versatune_ds import report
from versatune_ds.cli import main

NAMES = ["law", "medicine", "code"]


def make_run(run: Path, *, with_mixture: bool = True) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": {"path": "/models/tiny"}, "data": {"domains": [{"name": n} for n in NAMES], "seq_len": 128},
        "mixture": {"strategy": "versatune", "unit": "tokens", "rule": "versatune", "eta": 1.0, "smoothing": 0.1,
                    "floor": 0.01, "max_change": 0.2},
        "train": {"max_steps": 30, "learning_rate": 1e-4, "seed": 1},
    }))
    (run / "probe").mkdir(exist_ok=True)
    (run / "probe" / "distribution.json").write_text(json.dumps({
        "domains": NAMES, "p": [0.5, 0.3, 0.2], "ci_low": [0.45, 0.25, 0.15], "ci_high": [0.55, 0.35, 0.25],
        "num_texts": 100, "start_token": "<s>", "estimator": "mean",
    }))
    lines = []
    for step in range(0, 31, 10):
        lines.append({"step": step, "train/loss": 3.0 - 0.05 * step})
        lines.append({"step": step, **{f"eval/{n}/loss": 2.0 + i * 0.1 - 0.01 * step for i, n in enumerate(NAMES)}})
        lines.append({"step": step, **{f"mixture/{n}/weight": w for n, w in zip(NAMES, [0.5, 0.3, 0.2])}})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n{\"step\": 40, \"train/lo")
    if with_mixture:
        (run / "mixture.json").write_text(json.dumps({
            "domains": NAMES, "initial_weights": dict(zip(NAMES, [0.5, 0.3, 0.2])),
            "updates": [{"step": 10, "new_weights": dict(zip(NAMES, [0.4, 0.35, 0.25]))},
                        {"step": 20, "new_weights": dict(zip(NAMES, [0.3, 0.4, 0.3]))}],
        }))
    return run


def test_report_builds_pngs_and_summary(tmp_path):
    run = make_run(tmp_path / "run")
    summary = report.build_report(run)
    out = run / "report"
    for name in ("weights.png", "eval_loss.png", "train_loss.png", "probe_distribution.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert f"]({name})" in summary.read_text()
    text = summary.read_text()
    for name in NAMES:
        assert text.count(f"| {name} |") == 3  # probe table, weights table, loss table
    assert "| law | 0.5000 | 0.3000 |" in text  # initial vs final from mixture.json
    assert "| law | 2.0000 (0) | 1.7000 (30) | -0.3000 |" in text
    assert "2 update(s)" in text and "/models/tiny" in text
    assert "Training loss: 3.0000 at step 0 -> 1.5000 at step 30" in text  # the torn last line is ignored


def test_report_weights_from_metrics_without_mixture_json(tmp_path):
    run = make_run(tmp_path / "run", with_mixture=False)
    text = report.build_report(run).read_text()
    assert "| medicine | 0.3000 | 0.3000 |" in text
    assert (run / "report" / "weights.png").stat().st_size > 5000


def test_report_of_empty_run_dir_says_what_is_missing(tmp_path):
    text = report.build_report(tmp_path).read_text()
    assert "No probe/distribution.json" in text and "(no data)" in text
    assert not (tmp_path / "report" / "weights.png").exists()


def test_report_command(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert main(["report", "--run-dir", str(run)]) == 0
    assert (run / "report" / "summary.md").is_file()
    assert main(["report", "--run-dir", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_domain_names_from_metrics_keys():
    records = [{"step": 0, "eval/a/loss": 1.0, "mixture/b/weight": 0.5, "train/loss": 2.0}]
    assert report.domain_names({}, None, None, records) == ["a", "b"]


@pytest.mark.parametrize("bad", ["not json", "[1, 2]"])
def test_report_survives_broken_json(tmp_path, bad):
    run = make_run(tmp_path / "run")
    (run / "mixture.json").write_text(bad)
    text = report.build_report(run).read_text()
    assert "| code | 0.2000 | 0.2000 |" in text  # fell back to the metrics log


def test_report_lists_the_software_of_every_start(tmp_path):
    run = make_run(tmp_path / "run")
    text = report.build_report(run).read_text()
    assert "No provenance.jsonl" in text
    starts = [
        {"started_at": "2026-12-02T01:26:00+0000", "resumed_from": None, "world_size": 2, "versatune_ds": "0.1.0",
         "source": {"commit": "0123456789abcdef", "dirty": False}, "torch": "2.13.0", "deepspeed": "0.19.8",
         "transformers": "5.24.0", "host": "node1", "slurm_job_id": "77"},
        {"started_at": "2026-12-02T03:00:00+0000", "resumed_from": str(run / "checkpoints" / "step_00000020"), "world_size": 4,
         "versatune_ds": "0.1.0", "source": {"commit": "fedcba9876543210", "dirty": True}, "torch": "2.13.0",
         "deepspeed": "0.19.8", "transformers": "5.24.0", "host": "node2", "slurm_job_id": None},
    ]
    (run / "provenance.jsonl").write_text("".join(json.dumps(s) + "\n" for s in starts) + '{"torn')
    text = report.build_report(run).read_text()
    assert "| 2026-12-02T01:26:00+0000 | fresh start | 2 | 0.1.0 (0123456789) | 2.13.0 | 0.19.8 | 5.24.0 | node1 | 77 |" in text
    assert "| step_00000020 | 4 | 0.1.0 (fedcba9876, uncommitted changes) |" in text and "| node2 | - |" in text
