"""`versatune-ds preview`: rows as training sees them, for people (rich, loss highlighted) and scripts (--json)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


def _config(tmp_path: Path, model_dir: Path, train: str, **data) -> Path:
    raw = {"model": {"path": str(model_dir)},
           "data": {"domains": [{"name": "general", "train": train}, {"name": "law", "train": str(SAMPLE / "law.jsonl")}],
                    "seq_len": 512, "cache_dir": str(tmp_path / "cache"), **data}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_json_rows_for_scripts(run_cli, tiny_model_dir, tmp_path) -> None:
    config = _config(tmp_path, tiny_model_dir, str(SAMPLE / "formats" / "general_sharegpt.jsonl"))
    code, out, err = run_cli(["preview", "--config", str(config), "--domain", "general", "--json"])
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 5  # the default
    first = rows[0]
    assert first["source"] == f"{SAMPLE / 'formats' / 'general_sharegpt.jsonl'}:1" and first["tools"] is None
    assert [(m["role"], m["loss"]) for m in first["messages"]] == [("user", False), ("assistant", True), ("user", False), ("assistant", True)]
    assert first["messages"][1]["content"] == "The capital of Japan is Tokyo."
    assert first["loss_text"] == [m["content"] + "</s>" for m in first["messages"] if m["loss"]]
    assert 0 < first["num_loss_tokens"] < first["num_tokens"] and first["skipped"] is None and not first["truncated"]
    code, out, _ = run_cli(["preview", "--config", str(config), "--domain", "law", "--json", "--rows", "all"])
    assert code == 0 and len(out.splitlines()) == 40


def test_plain_text_marks_the_loss_and_the_source(run_cli, tiny_model_dir, tmp_path) -> None:
    config = _config(tmp_path, tiny_model_dir, str(SAMPLE / "formats" / "general_messages.jsonl"))
    code, out, err = run_cli(["preview", "--config", str(config), "--domain", "general", "--rows", "2"])
    assert code == 0, err
    assert "loss-bearing text is shown between [[ and ]]" in out
    assert "general_messages.jsonl:1: " in out and "general_messages.jsonl:2: " in out and "general_messages.jsonl:3" not in out
    assert "[[The capital of Japan is Tokyo.</s>]]" in out and "[[What is the capital" not in out
    assert "You are a concise assistant." in out  # the system turn of row 2, in the table and the text


def test_a_terminal_gets_the_loss_highlighted(tiny_model_dir, tmp_path) -> None:
    from versatune_ds.config.loading import load_config
    from versatune_ds.data.preview import preview_domain, print_rows
    from versatune_ds.data.tokenizer import load_tokenizer

    cfg = load_config(_config(tmp_path, tiny_model_dir, str(SAMPLE / "formats" / "general_messages.jsonl")))
    rows, diagnostics = preview_domain(cfg.data, "general", load_tokenizer(cfg.model), 1)
    buffer = io.StringIO()
    print_rows(rows, Console(file=buffer, force_terminal=True, color_system="standard", width=120))
    text = buffer.getvalue()
    assert "\x1b[" in text and "[[" not in text
    highlighted = "\x1b[1;30;42mThe capital of Japan is Tokyo.</s>\x1b[0m"
    assert highlighted in text and "\x1b[1;30;42mWhat is the capital" not in text
    assert diagnostics.entries == {}


def test_preview_skips_like_training_and_says_why(run_cli, tiny_model_dir, tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    rows = [{"instruction": "Short?", "output": "Yes."}, {"instruction": "Long? " * 300, "output": "No."}, {"instruction": "Q", "output": ""}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = _config(tmp_path, tiny_model_dir, str(path), truncation="skip")
    code, out, err = run_cli(["preview", "--config", str(config), "--domain", "general", "--json", "--rows", "all"])
    assert code == 0, err
    shown = [json.loads(line) for line in out.splitlines()]
    assert [r["source"].rsplit(":", 1)[1] for r in shown] == ["1", "2"]
    assert shown[1]["skipped"].endswith("more than data.seq_len=512 (data.truncation=skip)")
    assert "domain general: 2 of 3 rows skipped" in err
    assert "rows.jsonl:3" in err and "only assistant turn(s) are empty" in err and "longer than data.seq_len" in err


@pytest.mark.parametrize("argv, message", [
    (["--domain", "nope"], "--domain: unknown domain 'nope'; known domains: general, law"),
    (["--domain", "law", "--rows", "0"], "--rows: given '0'; expected a positive number or 'all'"),
])
def test_bad_arguments_are_one_line(argv, message, run_cli, tiny_model_dir, tmp_path) -> None:
    config = _config(tmp_path, tiny_model_dir, str(SAMPLE / "general.jsonl"))
    code, _, err = run_cli(["preview", "--config", str(config), *argv])
    assert code == 2 and message in err and "Traceback" not in err


def test_the_tools_sample_renders_with_a_tool_template(run_cli, tiny_model_dir, tmp_path) -> None:
    for template in ("qwen2.5", "mistral"):
        config = _config(tmp_path, tiny_model_dir, str(SAMPLE / "formats" / "general_tools.jsonl"), template=template, seq_len=2048)
        code, out, err = run_cli(["preview", "--config", str(config), "--domain", "general", "--json", "--rows", "all"])
        assert code == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        assert len(rows) == 4 and [len(r["tools"]) for r in rows] == [1, 1, 2, 1]
        third = rows[2]["messages"]
        assert [(m["role"], m["loss"]) for m in third] == [("user", False), ("assistant", False), ("user", False), ("assistant", True),
                                                           ("tool", False), ("assistant", True)]
        assert third[3]["tool_calls"] == [{"type": "function", "function": {"name": "convert_units",
                                                                            "arguments": {"value": 100, "from_unit": "F", "to_unit": "C"}},
                                           "id": "f1e2d3c4b"}]
        assert len(rows[2]["loss_text"]) == 2 and "Let me convert it first." not in "".join(rows[2]["loss_text"])
