"""Every format and quirk of the SFT data users bring, through `versatune-ds preview --json` (tests/formats/).

Each fixture file is run as one domain's `train` with `format: auto`. The test checks what preview prints:
the exact messages (role, content, loss, tool calls, tool ids) and tools of every row, loss on exactly the
assistant turns marked `loss` (the loss-bearing text of each turn is its answer plus the end-of-turn marker),
and for rows that load with warnings or files that are refused, the message naming `file:line` and the reason.
Rows with tools are rendered with the `qwen2.5` catalogue template (the tiny model's own template cannot express
tools, which is checked too).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

FORMATS = Path(__file__).resolve().parent / "formats"
CASES = json.loads((FORMATS / "expected.json").read_text(encoding="utf-8"))
END_MARKERS = {"auto": "</s>", "qwen2.5": "<|im_end|>"}


def _uses_tools(rows: list[dict] | None) -> bool:
    return any(r.get("tools") or any(m["role"] == "tool" or m.get("tool_calls") for m in r["messages"]) for r in rows or [])


def _config(tmp_path: Path, model_dir: Path, train: str, template: str = "auto", columns: dict | None = None, **data) -> Path:
    domain = {"name": "d", "train": train, **({"columns": columns} if columns else {})}
    raw = {
        "model": {"path": str(model_dir)},
        "data": {"domains": [domain], "seq_len": 1024, "cache_dir": str(tmp_path / "cache"), "template": template, **data},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _preview(run_cli, config: Path, *extra: str) -> tuple[int, list[dict], str]:
    code, out, err = run_cli(["preview", "--config", str(config), "--domain", "d", "--rows", "all", "--json", *extra])
    assert "Traceback" not in err
    return code, [json.loads(line) for line in out.splitlines() if line.strip()], err


def _row_shape(row: dict) -> dict:
    """What expected.json lists of a printed row."""
    return {"messages": row["messages"], **({"tools": row["tools"]} if row["tools"] else {})}


def _check_loss_text(row: dict, end_marker: str) -> None:
    """One loss-bearing piece per trained assistant turn, in order: its answer, then the end-of-turn marker."""
    trained = [m for m in row["messages"] if m["loss"]]
    assert all(m["role"] == "assistant" for m in trained)
    assert len(row["loss_text"]) == len(trained) and row["num_loss_tokens"] > 0
    for piece, message in zip(row["loss_text"], trained):
        assert piece.endswith(end_marker), (piece, end_marker)
        assert message["content"].strip() in piece
        for call in message.get("tool_calls", []):
            assert call["function"]["name"] in piece and json.dumps(call["function"]["arguments"]) in piece
    untrained = [m["content"] for m in row["messages"] if not m["loss"] and len(m["content"].strip()) > 3]
    assert not any(content in piece for content in untrained for piece in row["loss_text"])


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_fixture_through_preview_json(case: dict, run_cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    template = "qwen2.5" if _uses_tools(case.get("rows")) else "auto"
    config = _config(tmp_path, tiny_model_dir, str(FORMATS / case["file"]), template)
    code, rows, err = _preview(run_cli, config, *case.get("overrides", []))
    if case["outcome"] == "refuse":
        assert code == 2 and rows == []
        for pattern in case["expect"]:
            assert re.search(pattern, err), f"{pattern!r} not in:\n{err}"
        return
    assert code == 0, err
    assert [_row_shape(r) for r in rows] == case["rows"]
    for row in rows:
        assert set(row) >= {"source", "messages", "tools", "num_tokens", "num_loss_tokens"} and not row["skipped"]
        assert row["source"].startswith(str(FORMATS / case["file"]))
        _check_loss_text(row, END_MARKERS[template])
    if case["outcome"] == "load":
        assert "rows skipped" not in err, err
    for pattern in case["expect"]:
        assert re.search(pattern, err), f"{pattern!r} not in:\n{err}"
    assert "domain d:" in err or case["outcome"] == "load"


# ----------------------------------------------------------------------------------------------
# Settings that change what a fixture gives


def test_bad_tool_arguments_are_a_bad_row_by_default(run_cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, tiny_model_dir, str(FORMATS / "messages_tool_call_args_variants.jsonl"), "qwen2.5")
    code, rows, err = _preview(run_cli, config)
    assert code == 2 and "messages_tool_call_args_variants.jsonl:4: turn 2: tool-call arguments are not valid JSON" in err
    assert "data.on_bad_row=skip" in err


def test_custom_columns_load_once_mapped(run_cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    columns = {"prompt": "toy_input", "response": "toy_output", "system": "toy_system"}
    config = _config(tmp_path, tiny_model_dir, str(FORMATS / "columns_custom_names.json"), columns=columns)
    code, rows, err = _preview(run_cli, config)
    assert code == 0, err
    assert [_row_shape(r) for r in rows] == [{"messages": [
        {"role": "system", "content": "You are brief.", "loss": False},
        {"role": "user", "content": "Capital of Peru?", "loss": False},
        {"role": "assistant", "content": "Lima.", "loss": True},
    ]}]


def test_a_mapping_reads_only_its_columns_and_names_the_rest(run_cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    row = {"question": "Q1?", "answer": "A1.", "input": "unrelated context", "system": "S.", "id": 7}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    config = _config(tmp_path, tiny_model_dir, str(path), columns={"prompt": "question", "response": "answer"})
    code, rows, err = _preview(run_cli, config)
    assert code == 0
    assert [(m["role"], m["content"]) for m in rows[0]["messages"]] == [("user", "Q1?"), ("assistant", "A1.")]
    assert "columns not read" in err and "(input, system)" in err


def test_turn_tags_map_other_speaker_names(run_cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    turns = [{"speaker": "Q", "text": "Hi?"}, {"speaker": "A", "text": "Hello."}, {"speaker": "Q", "text": "Bye?"},
             {"speaker": "A", "text": "Bye.", "weight": 0}, {"speaker": "A", "text": "See you."}]
    path.write_text(json.dumps([{"dialogue": turns, "persona": "Be kind."}]), encoding="utf-8")
    columns = {"messages": "dialogue", "role_tag": "speaker", "content_tag": "text", "user_tag": "Q", "assistant_tag": "A",
               "system": "persona"}
    code, rows, err = _preview(run_cli, _config(tmp_path, tiny_model_dir, str(path), columns=columns))
    assert code == 0, err
    assert [(m["role"], m["content"], m["loss"]) for m in rows[0]["messages"]] == [
        ("system", "Be kind.", False), ("user", "Hi?", False), ("assistant", "Hello.", True), ("user", "Bye?", False),
        ("assistant", "Bye.", False), ("assistant", "See you.", True),
    ]
    assert rows[0]["loss_text"] == ["Hello.</s>", "See you.</s>"]


def test_loss_on_last_assistant_with_per_turn_weights(run_cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, tiny_model_dir, str(FORMATS / "alpaca_history.jsonl"), loss_on="last_assistant")
    code, rows, _ = _preview(run_cli, config)
    assert code == 0
    assert [[m["loss"] for m in r["messages"] if m["role"] == "assistant"] for r in rows] == [[False, False, True], [True]]
    assert rows[0]["loss_text"] == ["Also 12 - multiplication commutes.</s>"]
    # The last answer has weight 0 in row 1 of this file: with loss on the last answer only, nothing is left to learn.
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                             {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "weight": 0}]})
                    + "\n" + (FORMATS / "messages_basic.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    code, rows, err = _preview(run_cli, _config(tmp_path, tiny_model_dir, str(path), loss_on="last_assistant"))
    assert code == 0 and len(rows) == 1
    assert "1 row skipped: no assistant turn bears loss" in err and "w.jsonl:1" in err


def test_a_template_without_tools_refuses_tool_rows(run_cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    for template in ("auto", "llama3", "simple"):
        config = _config(tmp_path, tiny_model_dir, str(FORMATS / "messages_tool_calls.jsonl"), template)
        code, rows, err = _preview(run_cli, config)
        assert code == 2 and "messages_tool_calls.jsonl:1: " in err and "cannot express tools or tool calls" in err, err
    # Skipped under on_bad_row=skip: counted and named, never trained flattened.
    config = _config(tmp_path, tiny_model_dir, str(FORMATS / "messages_tool_calls.jsonl"), "llama3", on_bad_row="skip")
    code, rows, err = _preview(run_cli, config)
    assert code == 0 and [r["skipped"] for r in rows] != ["", ""] and all("cannot express tools" in r["skipped"] for r in rows)


def test_media_rows_are_skipped_and_named_under_skip(run_cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text((FORMATS / "images.jsonl").read_text(encoding="utf-8") + (FORMATS / "messages_basic.jsonl").read_text(encoding="utf-8"),
                    encoding="utf-8")
    code, rows, err = _preview(run_cli, _config(tmp_path, tiny_model_dir, str(path), on_bad_row="skip"))
    assert code == 0 and len(rows) == 1 and rows[0]["source"].endswith("mixed.jsonl:2")
    assert "1 of 2 rows skipped" in err and "mixed.jsonl:1 (rows carry images" in err


def test_explicit_format_reads_either_turn_list(run_cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, tiny_model_dir, str(FORMATS / "messages_basic.jsonl"))
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    raw["data"]["domains"][0]["format"] = "sharegpt"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    code, rows, _ = _preview(run_cli, config)
    assert code == 0 and rows[0]["messages"][0]["role"] == "system"
    raw["data"]["domains"][0]["format"] = "alpaca"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    code, _, err = _preview(run_cli, config)
    assert code == 2 and "data.domains[0].format is 'alpaca' but the rows look like messages" in err
