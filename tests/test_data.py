from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from versatune_ds.config.loading import load_config
from versatune_ds.data import prepare as data
from versatune_ds.data import sources
from versatune_ds.data.packing import IGNORE_INDEX
from versatune_ds.data.tokenizer import load_tokenizer
from versatune_ds.domains import Domains
from versatune_ds.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _alpaca(i: int) -> dict:
    return {"instruction": f"Question number {i}?", "input": "context" if i % 2 else "", "output": f"answer {i}"}


def _write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def _config(tmp_path: Path, domains: list[dict], **data_overrides):
    raw = {
        "model": {"path": "unused"},
        "data": {"domains": domains, "cache_dir": str(tmp_path / "cache"), "seq_len": 256, **data_overrides},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return load_config(path)


def _domain(tmp_path: Path, name: str, rows: list, **extra) -> dict:
    return {"name": name, "train": str(_write_jsonl(tmp_path / f"{name}.jsonl", rows)), **extra}


def _decode_loss(tokenizer, ids: np.ndarray, labels: np.ndarray) -> str:
    return tokenizer.decode(ids[labels != IGNORE_INDEX])


# ----------------------------------------------------------------------------------------------
# Loading, formats, held-out


def test_prepare_counts_and_masks(tmp_path, tokenizer) -> None:
    rows = [_alpaca(i) for i in range(40)]
    cfg = _config(tmp_path, [_domain(tmp_path, "a", rows)], heldout_fraction=0.1)
    prepared = data.prepare_data(cfg.data, tokenizer)
    domain = prepared.per_domain[0]
    assert prepared.packed and prepared.pad_token_id == tokenizer.pad_token_id
    assert domain.train_examples == 36 and len(domain.heldout) == 4
    assert domain.train_tokens == sum(r.num_tokens for r in domain.train_rows)
    assert domain.train_loss_tokens == sum(int((r.labels != IGNORE_INDEX).sum()) for r in domain.train_rows)
    # Direct count: render every training row with the chat template and tokenize it alone.
    held = {_decode_loss(tokenizer, e.input_ids, e.labels) for e in domain.heldout}
    total = 0
    for row in rows:
        messages = [{"role": "user", "content": row["instruction"] + ("\n" + row["input"] if row["input"] else "")},
                    {"role": "assistant", "content": row["output"]}]
        if row["output"] + "</s>" in held:
            continue
        total += len(tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])
    assert total == domain.train_tokens


def test_heldout_split_is_fixed_disjoint_and_capped(tmp_path, tokenizer) -> None:
    rows = [_alpaca(i) for i in range(60)]
    cfg = _config(tmp_path, [_domain(tmp_path, "a", rows)], heldout_fraction=0.5, heldout_max_examples=7, packing=False)
    first = data.prepare_data(cfg.data, tokenizer).per_domain[0]
    assert len(first.heldout) == 7 and first.train_examples == 53
    held = {_decode_loss(tokenizer, e.input_ids, e.labels) for e in first.heldout}
    trained = {_decode_loss(tokenizer, r.input_ids, r.labels) for r in first.train_rows}
    assert len(held) == 7 and held.isdisjoint(trained) and len(trained) == 53
    # The same rows with another seq_len and no cache (the split depends on the file contents only).
    other = _config(tmp_path, [_domain(tmp_path, "a", rows)], heldout_fraction=0.5, heldout_max_examples=7, packing=False,
                    cache_dir=str(tmp_path / "other_cache"), seq_len=200)
    again = data.prepare_data(other.data, tokenizer).per_domain[0]
    assert {_decode_loss(tokenizer, e.input_ids, e.labels) for e in again.heldout} == held
    assert data.split_heldout(10, 0.0, 5, seed=1)[1].__len__() == 1  # at least one


def test_explicit_heldout_files_and_max_examples(tmp_path, tokenizer) -> None:
    held_file = _write_jsonl(tmp_path / "held.jsonl", [_alpaca(100 + i) for i in range(3)])
    cfg = _config(tmp_path, [_domain(tmp_path, "a", [_alpaca(i) for i in range(20)], heldout=str(held_file))],
                  max_examples_per_domain=5)
    domain = data.prepare_data(cfg.data, tokenizer).per_domain[0]
    assert domain.train_examples == 5
    assert sorted(_decode_loss(tokenizer, e.input_ids, e.labels) for e in domain.heldout) == [
        f"answer {100 + i}</s>" for i in range(3)
    ]


def test_json_parquet_folder_and_auto_format(tmp_path, tokenizer) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps([_alpaca(i) for i in range(4)], indent=2), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([_alpaca(i) for i in range(4, 8)]), folder / "b.parquet")
    chats = [{"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"answer {i}"}]} for i in range(8, 12)]
    _write_jsonl(folder / "c.jsonl", chats)
    messages = [{"messages": [{"role": "user", "content": f"yo {i}"}, {"role": "assistant", "content": f"answer {i}"}]} for i in range(12, 16)]
    _write_jsonl(folder / "d.jsonl", messages)
    cfg = _config(tmp_path, [{"name": "a", "train": str(folder)}], heldout_max_examples=1, packing=False)
    domain = data.prepare_data(cfg.data, tokenizer).per_domain[0]
    answers = {_decode_loss(tokenizer, r.input_ids, r.labels) for r in domain.train_rows} | {
        _decode_loss(tokenizer, e.input_ids, e.labels) for e in domain.heldout
    }
    assert answers == {f"answer {i}</s>" for i in range(16)}


def test_json_list_rows_keep_line_numbers(tmp_path) -> None:
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"a": 1},\n\n  {"b": 2}\n]\n', encoding="utf-8")
    assert [(where, row) for where, row, _ in sources.read_rows(str(path))] == [(f"{path}:2", {"a": 1}), (f"{path}:4", {"b": 2})]


def test_packing_off_gives_one_example_per_row(tmp_path, tokenizer) -> None:
    rows = [_alpaca(i) for i in range(30)]
    packed = data.prepare_data(_config(tmp_path, [_domain(tmp_path, "a", rows)]).data, tokenizer).per_domain[0]
    plain = data.prepare_data(_config(tmp_path, [_domain(tmp_path, "a", rows)], packing=False).data, tokenizer).per_domain[0]
    assert len(plain.train_rows) == plain.train_examples > len(packed.train_rows)
    assert packed.train_tokens == plain.train_tokens and packed.fingerprint != plain.fingerprint


# ----------------------------------------------------------------------------------------------
# Cache


def test_second_prepare_hits_the_cache(tmp_path, tokenizer, monkeypatch, caplog) -> None:
    cfg = _config(tmp_path, [_domain(tmp_path, "a", [_alpaca(i) for i in range(20)])])
    first = data.prepare_data(cfg.data, tokenizer)

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds this domain")

    monkeypatch.setattr(data, "tokenize_records", fail)
    with caplog.at_level(logging.INFO, logger="versatune_ds.data"):
        second = data.prepare_data(cfg.data, tokenizer)
    assert "cache hit" in caplog.text
    a, b = first.per_domain[0], second.per_domain[0]
    assert a.fingerprint == b.fingerprint and a.train_tokens == b.train_tokens
    assert all(np.array_equal(x.input_ids, y.input_ids) for x, y in zip(a.train_rows, b.train_rows))
    # A setting that changes the tokens misses the cache.
    with pytest.raises(AssertionError, match="tokenized again"):
        data.prepare_data(_config(tmp_path, [_domain(tmp_path, "a", [_alpaca(i) for i in range(20)])], seq_len=128).data, tokenizer)
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_concurrent_prepares_agree(tmp_path, tokenizer) -> None:
    cfg = _config(tmp_path, [_domain(tmp_path, "a", [_alpaca(i) for i in range(30)])])
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: data.prepare_data(cfg.data, tokenizer), range(3)))
    fingerprints = {r.per_domain[0].fingerprint for r in results}
    tokens = {r.per_domain[0].train_tokens for r in results}
    assert len(fingerprints) == 1 and len(tokens) == 1
    files = list((tmp_path / "cache" / "tokenized").glob("*.npz"))
    assert len(files) == 1
    assert data.prepare_data(cfg.data, tokenizer).per_domain[0].train_tokens == tokens.pop()


def test_num_proc_gives_the_same_tokens(tmp_path, tokenizer) -> None:
    rows = [_alpaca(i) for i in range(140)]
    one = data.prepare_data(_config(tmp_path, [_domain(tmp_path, "a", rows)]).data, tokenizer).per_domain[0]
    two = data.prepare_data(_config(tmp_path, [_domain(tmp_path, "a", rows)], num_proc=2,
                                    cache_dir=str(tmp_path / "cache2")).data, tokenizer).per_domain[0]
    assert one.fingerprint == two.fingerprint
    assert [r.input_ids.tolist() for r in one.train_rows] == [r.input_ids.tolist() for r in two.train_rows]
    assert [r.labels.tolist() for r in one.train_rows] == [r.labels.tolist() for r in two.train_rows]


# ----------------------------------------------------------------------------------------------
# Truncation


def test_truncation_policies(tmp_path, tokenizer) -> None:
    rows = [_alpaca(i) for i in range(10)] + [{"instruction": "long", "output": "word " * 200}]
    with pytest.raises(UserError, match=r"a\.jsonl:11: the example has \d+ tokens, more than data.seq_len=64.*data.truncation=truncate"):
        data.prepare_data(_config(tmp_path, [_domain(tmp_path, "a", rows)], seq_len=64, heldout_max_examples=1).data, tokenizer)
    skipped = data.prepare_data(
        _config(tmp_path, [_domain(tmp_path, "a", rows, heldout=str(_write_jsonl(tmp_path / "h.jsonl", [_alpaca(99)])))],
                seq_len=64, truncation="skip").data, tokenizer
    ).per_domain[0]
    assert skipped.train_examples == 10 and list(skipped.skipped.values()) == [1]
    truncated = data.prepare_data(
        _config(tmp_path, [_domain(tmp_path, "a", rows, heldout=str(tmp_path / "h.jsonl"))], seq_len=64, truncation="truncate").data,
        tokenizer,
    ).per_domain[0]
    assert truncated.train_examples == 11 and max(r.num_tokens for r in truncated.train_rows) <= 64


# ----------------------------------------------------------------------------------------------
# Bad input: one test per case, each names file:line (or the key) and what to do


def test_malformed_json_line(tmp_path, tokenizer) -> None:
    domain = _domain(tmp_path, "a", [_alpaca(0), '{"instruction": "x", "output": ', _alpaca(2), _alpaca(3)])
    with pytest.raises(UserError, match=r"a\.jsonl:2: not valid JSON .*data.on_bad_row=skip"):
        data.prepare_data(_config(tmp_path, [domain]).data, tokenizer)


def test_row_missing_a_field(tmp_path, tokenizer) -> None:
    domain = _domain(tmp_path, "a", [_alpaca(0), _alpaca(1), {"instruction": "x", "output": "y"}, {"instruction": "no output"}])
    with pytest.raises(UserError, match=r"a\.jsonl:4: missing required field 'output'"):
        data.prepare_data(_config(tmp_path, [domain]).data, tokenizer)
    domain = _domain(tmp_path, "b", [_alpaca(0), _alpaca(1), {"instruction": "x", "output": ["a", "list"]}])
    with pytest.raises(UserError, match=r"b\.jsonl:3: output is a list whose item 1 is not a typed part"):
        data.prepare_data(_config(tmp_path, [domain]).data, tokenizer)


def test_bad_rows_skipped_are_counted_and_logged(tmp_path, tokenizer, caplog) -> None:
    rows = [_alpaca(i) for i in range(6)] + ["not json", {"instruction": "no output"}, b"\xff\xfe".decode("latin-1")]
    domain = _domain(tmp_path, "a", rows)
    with caplog.at_level(logging.WARNING, logger="versatune_ds.data"):
        result = data.prepare_data(_config(tmp_path, [domain], on_bad_row="skip").data, tokenizer).per_domain[0]
    assert result.skipped == {domain["train"]: 3}
    assert result.train_examples + len(result.heldout) == 6
    assert "domain a: 3 of 9 rows skipped" in caplog.text
    assert "a.jsonl:7 (not valid JSON" in caplog.text and "a.jsonl:8 (missing required field 'output')" in caplog.text


def test_empty_domain(tmp_path, tokenizer) -> None:
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"data.domains\[1\].train: domain 'b': \S*empty.jsonl: no records"):
        data.prepare_data(_config(tmp_path, [_domain(tmp_path, "a", [_alpaca(0), _alpaca(1)]),
                                             {"name": "b", "train": str(tmp_path / "empty.jsonl")}]).data, tokenizer)


def test_all_rows_bad_and_skipped_is_an_empty_domain(tmp_path, tokenizer) -> None:
    rows = [_alpaca(0), {"instruction": "no output"}, "not json"]
    with pytest.raises(UserError, match=r"a\.jsonl: no usable rows: all 2 skipped .*the first: \S*a.jsonl:1: missing required field"):
        data.prepare_data(_config(tmp_path, [_domain(tmp_path, "a", rows[1:], format="alpaca")], on_bad_row="skip").data, tokenizer)


def test_format_that_does_not_match(tmp_path, tokenizer) -> None:
    chat = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    mixed = _domain(tmp_path, "m", [_alpaca(0), _alpaca(1), chat])
    with pytest.raises(UserError, match=r"m\.jsonl:3: the row does not match the file's format alpaca"):
        data.prepare_data(_config(tmp_path, [mixed]).data, tokenizer)
    domain = _domain(tmp_path, "a", [_alpaca(0), _alpaca(1)], format="sharegpt")
    with pytest.raises(UserError, match=r"a\.jsonl:1: data.domains\[0\].format is 'sharegpt' but the rows look like alpaca"):
        data.prepare_data(_config(tmp_path, [domain]).data, tokenizer)
    unknown = _domain(tmp_path, "b", [{"query_text": "q", "reply": "a"}])
    with pytest.raises(UserError, match=r"b\.jsonl:1: cannot tell the row format .*columns: \{prompt: query_text, response: reply\}"):
        data.prepare_data(_config(tmp_path, [unknown]).data, tokenizer)


def test_non_utf8_file(tmp_path, tokenizer) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(json.dumps(_alpaca(0)).encode() + b"\n" + '{"instruction": "caf\xe9", "output": "x"}'.encode("latin-1") + b"\n")
    with pytest.raises(UserError, match=r"a\.jsonl:2: not UTF-8 text \(byte 0xe9; the file looks like Latin-1.*save the file as UTF-8"):
        data.prepare_data(_config(tmp_path, [{"name": "a", "train": str(path)}]).data, tokenizer)
    json_path = tmp_path / "b.json"
    json_path.write_bytes(b'[\n{"instruction": "caf\xe9", "output": "x"}\n]')
    with pytest.raises(UserError, match=r"b\.json:2: not UTF-8 text"):
        data.prepare_data(_config(tmp_path, [{"name": "b", "train": str(json_path)}]).data, tokenizer)


def test_domain_with_no_heldout_data(tmp_path, tokenizer) -> None:
    with pytest.raises(UserError, match=r"data.domains\[0\]: domain 'a' has no held-out data: 1 row\(s\).*heldout files"):
        data.prepare_data(_config(tmp_path, [_domain(tmp_path, "a", [_alpaca(0)])]).data, tokenizer)
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    domain = _domain(tmp_path, "b", [_alpaca(0), _alpaca(1)], heldout=str(tmp_path / "empty.jsonl"))
    with pytest.raises(UserError, match=r"data.domains\[0\].heldout: domain 'b' has no held-out data: \S*empty.jsonl: no records"):
        data.prepare_data(_config(tmp_path, [domain]).data, tokenizer)


def test_unknown_source_kind_and_missing_folder_files(tmp_path, tokenizer) -> None:
    (tmp_path / "rows.xml").write_text("<a/>\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"data.domains\[0\].train\[0\]: .*rows.xml is not a .jsonl, .json, .csv, .tsv, .parquet file"):
        data.prepare_data(_config(tmp_path, [{"name": "a", "train": str(tmp_path / "rows.xml")}]).data, tokenizer)


# ----------------------------------------------------------------------------------------------
# Tokenizer, texts, eval files


def test_load_tokenizer_sets_pad_and_passes_options(tmp_path, tiny_model_dir, monkeypatch, caplog) -> None:
    from transformers import AutoTokenizer

    no_pad = AutoTokenizer.from_pretrained(tiny_model_dir)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path / "tok")
    cfg = _config(tmp_path, [_domain(tmp_path, "a", [_alpaca(0), _alpaca(1)])])
    cfg = type(cfg)(**{**cfg.__dict__, "model": type(cfg.model)(path=str(tmp_path / "tok"))})
    with caplog.at_level(logging.INFO, logger="versatune_ds.data"):
        loaded = load_tokenizer(cfg.model)
    assert loaded.pad_token == loaded.eos_token == "</s>" and "padding with its eos" in caplog.text
    seen = {}
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda name, **kw: seen.update(name=name, **kw) or loaded)
    load_tokenizer(type(cfg.model)(path="m", gguf_file="m.gguf", trust_remote_code=True))
    assert seen == {"name": "m", "gguf_file": "m.gguf", "trust_remote_code": True}
    with pytest.raises(UserError, match="model.path: cannot load a tokenizer"):
        monkeypatch.undo()
        load_tokenizer(type(cfg.model)(path=str(tmp_path / "nothing")))


def test_classifier_corpus_texts(tmp_path) -> None:
    from versatune_ds.probe.corpus import classifier_corpus

    raw = _write_jsonl(tmp_path / "raw.jsonl", [{"text": "raw passage"}, {"text": "  "}])
    chats = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]}]
    cfg = _config(tmp_path, [_domain(tmp_path, "a", [_alpaca(1)], raw=str(raw)), _domain(tmp_path, "b", chats)])
    corpus = classifier_corpus(cfg.data)
    texts, ids = corpus.texts, corpus.labels.tolist()
    assert texts == ["Question number 1?\ncontext\nanswer 1", "raw passage", "S\nU\nA"]
    assert ids == [0, 0, 1]
    bad_raw = _write_jsonl(tmp_path / "bad_raw.jsonl", [{"body": "x"}])
    with pytest.raises(UserError, match=r"bad_raw\.jsonl:1: a raw text row needs a string field 'text'"):
        classifier_corpus(_config(tmp_path, [_domain(tmp_path, "a", [_alpaca(1)], raw=str(bad_raw))]).data)


def test_tokenize_sft_file(tmp_path, tokenizer) -> None:
    path = _write_jsonl(tmp_path / "eval.jsonl", [_alpaca(i) for i in range(5)])
    cfg = _config(tmp_path, [_domain(tmp_path, "a", [_alpaca(0), _alpaca(1)])])
    examples = data.tokenize_sft_file(str(path), tokenizer, cfg.data, Domains(tuple("abcd")), domain_id=3)
    assert [e.index for e in examples] == list(range(5)) and {e.domain_id for e in examples} == {3}
    assert [_decode_loss(tokenizer, e.input_ids, e.labels) for e in examples] == [f"answer {i}</s>" for i in range(5)]


def test_hf_source_from_a_local_folder(tmp_path, monkeypatch) -> None:
    """`hf:<name>[:<split>]` goes through datasets.load_dataset; a local folder stands in for the hub here."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "hub_like"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", [_alpaca(i) for i in range(3)])
    source = f"hf:{folder}:train"
    assert sources.expand_source(source, "key") == [source]
    rows = list(sources.read_rows(source))
    assert [where for where, _, _ in rows] == [f"{source} row {i}" for i in (1, 2, 3)]
    assert [row["output"] for _, row, _ in rows] == [f"answer {i}" for i in range(3)]
    assert sources.file_hash(source).startswith("hf-")
    with pytest.raises(UserError, match="cannot load the Hugging Face data set"):
        list(sources.read_rows(f"hf:{tmp_path / 'missing'}"))


def test_tokenize_sft_file_uses_the_domains_column_mapping(tmp_path, tokenizer) -> None:
    rows = [{"question": f"Q{i}?", "reply": f"A{i}.", "note": "x"} for i in range(3)]
    path = _write_jsonl(tmp_path / "held.jsonl", rows)
    cfg = _config(tmp_path, [{**_domain(tmp_path, "a", rows), "columns": {"prompt": "question", "response": "reply"}}])
    examples = data.tokenize_sft_file(str(path), tokenizer, cfg.data, Domains(("a",)), domain_id=0)
    assert [_decode_loss(tokenizer, e.input_ids, e.labels) for e in examples] == [f"A{i}.</s>" for i in range(3)]
