"""The tokenization cache: damaged files are rebuilt, a cold cache is tokenized once while other processes wait on a
file lock (with a timeout), a process killed mid-write leaves no damaged cache, and only rank 0 shows progress."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from versatune_ds.config.loading import load_config
from versatune_ds.data import cache, tokenization
from versatune_ds.data import prepare as data
from versatune_ds.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _config_file(tmp_path: Path, model_dir: Path, **data_overrides) -> Path:
    rows = [{"instruction": f"Question number {i}?", "output": f"answer {i}"} for i in range(40)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    raw = {"model": {"path": str(model_dir)},
           "data": {"domains": [{"name": "a", "train": str(tmp_path / "a.jsonl")}], "cache_dir": str(tmp_path / "cache"),
                    "seq_len": 256, **data_overrides}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _count_tokenizations(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = data.tokenize_records

    def counting(records, *args, **kwargs):
        calls.append(kwargs.get("tag", ""))
        return real(records, *args, **kwargs)

    monkeypatch.setattr(data, "tokenize_records", counting)
    return calls


def _damage(path: Path, how: str) -> None:
    good = path.read_bytes()
    if how == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(len(good)))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "flipped_byte":  # zip CRC check
        damaged = bytearray(good)
        damaged[len(damaged) // 2] ^= 0xFF
        path.write_bytes(bytes(damaged))
    elif how == "inconsistent_arrays":  # a well-formed file whose arrays do not fit together
        with np.load(path) as stored:
            arrays = {k: stored[k] for k in stored.files}
        arrays["train_lengths"] = arrays["train_lengths"][:-1]
        np.savez(str(path), **arrays)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "flipped_byte", "inconsistent_arrays"])
def test_a_damaged_cache_file_is_reported_and_rebuilt(how, tmp_path, tiny_model_dir, tokenizer, monkeypatch, caplog) -> None:
    cfg = load_config(_config_file(tmp_path, tiny_model_dir))
    first = data.prepare_data(cfg.data, tokenizer).per_domain[0]
    (cache_file,) = (tmp_path / "cache" / "tokenized").glob("*.npz")
    _damage(cache_file, how)
    calls = _count_tokenizations(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="versatune_ds.data"):
        again = data.prepare_data(cfg.data, tokenizer).per_domain[0]
    assert f"the data cache file {cache_file} is damaged or unreadable" in caplog.text
    assert len(calls) == 2  # train and held-out tokenized again
    assert again.fingerprint == first.fingerprint and again.train_tokens == first.train_tokens
    assert all(np.array_equal(x.input_ids, y.input_ids) for x, y in zip(first.train_rows, again.train_rows))
    assert cache.read_cache(cache_file) is not None  # replaced by a whole file: the next run hits it
    calls.clear()
    data.prepare_data(cfg.data, tokenizer)
    assert calls == []


def test_the_cache_replays_the_domain_warnings(tmp_path, tiny_model_dir, tokenizer, caplog) -> None:
    path = _config_file(tmp_path, tiny_model_dir)
    with open(tmp_path / "a.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    cfg = load_config(path, ["data.on_bad_row=skip"])
    with caplog.at_level(logging.WARNING, logger="versatune_ds.data"):
        data.prepare_data(cfg.data, tokenizer)
        first = caplog.text
        caplog.clear()
        cached = data.prepare_data(cfg.data, tokenizer).per_domain[0]
    assert "1 row skipped (data.on_bad_row=skip): " in first and "a.jsonl:41 (the row does not match" in first
    assert caplog.text.count("domain a: 1 of 41 rows skipped") == 1 and "a.jsonl:41" in caplog.text
    assert cached.skipped == {str(tmp_path / "a.jsonl"): 1}


# ----------------------------------------------------------------------------------------------
# One process tokenizes; the others wait on the lock


_CHILD = textwrap.dedent("""
    import logging, os, sys, time
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    from transformers import AutoTokenizer
    from versatune_ds.config.loading import load_config
    from versatune_ds.data import prepare

    config, model, ready, mode = sys.argv[1:5]
    real_tokenize, real_write = prepare.tokenize_records, prepare.write_cache

    def slow_tokenize(*args, **kwargs):
        print("TOKENIZING", flush=True)
        time.sleep(2.0)
        return real_tokenize(*args, **kwargs)

    def stalled_write(path, *args, **kwargs):
        Path(str(path) + ".partial.tmp").write_bytes(b"PK half a file")
        print("WRITING", flush=True)
        time.sleep(600)

    prepare.tokenize_records = slow_tokenize
    if mode == "stall":
        prepare.write_cache = stalled_write
    tokenizer = AutoTokenizer.from_pretrained(model)
    cfg = load_config(config)
    Path(ready + "." + str(os.getpid())).touch()
    while len(list(Path(ready).parent.glob(Path(ready).name + ".*"))) < int(os.environ.get("CHILDREN", "1")):
        time.sleep(0.01)
    result = prepare.prepare_data(cfg.data, tokenizer).per_domain[0]
    print("TOKENS", result.train_tokens, result.fingerprint, flush=True)
""")


def _start(config: Path, model_dir: Path, ready: Path, mode: str = "normal", children: int = 2) -> subprocess.Popen:
    env = {**os.environ, "CHILDREN": str(children), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(config), str(model_dir), str(ready), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.dist
def test_two_processes_tokenize_a_cold_cache_once(tmp_path, tiny_model_dir) -> None:
    config = _config_file(tmp_path, tiny_model_dir)
    ready = tmp_path / "ready"
    procs = [_start(config, tiny_model_dir, ready) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    tokenized = [out.count("TOKENIZING") for out, _ in outputs]
    assert sorted(tokenized) == [0, 2]  # one process tokenized train and held-out; the other read its cache file
    waiter = outputs[tokenized.index(0)]
    assert "another process is tokenizing it" in waiter[1] and "cache hit" in waiter[1]
    assert len({line for out, _ in outputs for line in out.splitlines() if line.startswith("TOKENS")}) == 1


@pytest.mark.dist
def test_a_process_killed_mid_write_leaves_no_damaged_cache(tmp_path, tiny_model_dir) -> None:
    config = _config_file(tmp_path, tiny_model_dir)
    stalled = _start(config, tiny_model_dir, tmp_path / "ready_a", mode="stall", children=1)
    try:
        lines = [stalled.stdout.readline() for _ in range(3)]
        assert lines == ["TOKENIZING\n", "TOKENIZING\n", "WRITING\n"]  # holds the lock, half a file under a temporary name
        waiter = _start(config, tiny_model_dir, tmp_path / "ready_b", children=1)
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob("ready_b.*")) and time.monotonic() < deadline:  # the waiter is about to prepare
            time.sleep(0.05)
        time.sleep(1.5)  # ... and is now blocked on the lock
        assert waiter.poll() is None
    finally:
        stalled.send_signal(signal.SIGKILL)
        stalled.wait()
    out, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, err
    assert "another process is tokenizing it" in err and out.count("TOKENIZING") == 2
    (cache_file,) = (tmp_path / "cache" / "tokenized").glob("*.npz")
    assert cache.read_cache(cache_file) is not None


def test_waiting_for_the_lock_times_out_with_a_clear_message(tmp_path, tiny_model_dir, tokenizer) -> None:
    cfg = load_config(_config_file(tmp_path, tiny_model_dir), ["data.lock_timeout_s=1"])
    data.prepare_data(cfg.data, tokenizer)
    (cache_file,) = (tmp_path / "cache" / "tokenized").glob("*.npz")
    cache_file.unlink()
    with cache.cache_lock(cache_file, 5, "test"):
        with pytest.raises(UserError, match=r"domain a: waited \d+ s \(data.lock_timeout_s=1\) for another process to tokenize "
                                            r"it \(held by \S+ pid \d+, lock file .*\.npz\.lock\); raise data.lock_timeout_s"):
            data.prepare_data(cfg.data, tokenizer)
    assert data.prepare_data(cfg.data, tokenizer).per_domain[0].train_examples == 38


# ----------------------------------------------------------------------------------------------
# Progress: rank 0 only


@pytest.mark.parametrize("rank, terminal, bar", [("0", True, True), ("0", False, False), ("1", True, False), ("3", False, False)])
def test_only_rank_0_shows_tokenization_progress(rank, terminal, bar, tmp_path, tiny_model_dir, tokenizer, monkeypatch, caplog) -> None:
    from datasets import Dataset
    from datasets.utils import logging as datasets_logging

    seen = []
    real_map = Dataset.map

    def spying_map(self, *args, **kwargs):
        seen.append(datasets_logging.is_progress_bar_enabled())
        return real_map(self, *args, **kwargs)

    monkeypatch.setattr(Dataset, "map", spying_map)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(tokenization.sys.stderr, "isatty", lambda: terminal)
    cfg = load_config(_config_file(tmp_path, tiny_model_dir))
    before = datasets_logging.is_progress_bar_enabled()
    with caplog.at_level(logging.INFO, logger="versatune_ds.data"):
        data.prepare_data(cfg.data, tokenizer)
    assert seen == [bar, bar] and datasets_logging.is_progress_bar_enabled() == before
    assert ("tokenizing a train: 38 rows" in caplog.text) == (rank == "0" and not terminal)
