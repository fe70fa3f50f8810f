from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from versatune_ds import cli, plan
from versatune_ds.config.loading import load_config
from versatune_ds.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _rows(prefix: str, count: int, words: int) -> list[dict]:
    return [{"instruction": f"{prefix} question {i}", "input": "", "output": " ".join([f"{prefix}{i}"] * words)} for i in range(count)]


def _write_config(tmp_path: Path, model_dir: Path, domains: dict[str, list[dict]], **sections) -> Path:
    entries = []
    for name, rows in domains.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        entries.append({"name": name, "train": str(path)})
    raw = {
        "model": {"path": str(model_dir)},
        "data": {"domains": entries, "cache_dir": str(tmp_path / "cache"), "seq_len": 512, **sections.pop("data", {})},
        "train": {"run_dir": str(tmp_path / "run"), "max_steps": 10, "micro_batch_size": 2, "gradient_accumulation_steps": 3},
        "mixture": {"strategy": "uniform"},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _direct_tokens(tokenizer, rows: list[dict]) -> int:
    """Tokens of every row rendered with the chat template and tokenized alone."""
    total = 0
    for row in rows:
        messages = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}]
        total += len(tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])
    return total


def _prepare(config: Path, tokenizer, overrides=()):
    from versatune_ds.data.prepare import prepare_data

    cfg = load_config(config, list(overrides))
    return cfg, prepare_data(cfg.data, tokenizer)


def test_token_accounting_matches_a_direct_count(tmp_path, tiny_model_dir, tokenizer) -> None:
    domains = {"a": _rows("a", 30, 3), "b": _rows("b", 20, 12)}
    cfg, data = _prepare(_write_config(tmp_path, tiny_model_dir, domains), tokenizer)
    result = plan.build_plan(cfg, data, np.array([0.5, 0.5]), "test", world_size=1)
    for domain_plan, domain_data, rows in zip(result.domains, data.per_domain, domains.values()):
        heldout_tokens = sum(e.num_tokens for e in domain_data.heldout)
        assert domain_plan.train_examples + domain_plan.heldout_examples == len(rows)
        assert domain_plan.train_tokens + heldout_tokens == _direct_tokens(tokenizer, rows)
        assert domain_plan.mean_tokens_per_example == pytest.approx(domain_plan.train_tokens / domain_plan.train_examples)
        assert domain_plan.rows == len(domain_data.train_rows) and domain_plan.skipped_rows == 0


def test_budget_arithmetic_in_examples_and_tokens(tmp_path, tiny_model_dir, tokenizer) -> None:
    domains = {"a": _rows("a", 30, 3), "b": _rows("b", 20, 12)}
    config = _write_config(tmp_path, tiny_model_dir, domains, data={"packing": False})
    cfg, data = _prepare(config, tokenizer, ["mixture.unit=examples"])
    weights = plan.parse_weights("a=3,b=1", data.domains)
    result = plan.build_plan(cfg, data, weights, "--weights", world_size=4)
    assert result.rows_per_step == 2 * 3 * 4 and result.total_samples == 10 * 24 == 240
    # Unpacked rows are examples, so example shares are row shares: 180 and 60 rows.
    assert [d.samples for d in result.domains] == [180, 60]
    for d, dd in zip(result.domains, data.per_domain):
        assert d.tokens == pytest.approx(d.samples * dd.train_tokens / dd.train_examples)
        assert d.epochs == pytest.approx(d.samples / d.rows)
    # Token shares: expected drawn tokens split 3:1 (up to the integer rounding of rows).
    cfg_tokens, data_tokens = _prepare(config, tokenizer, ["mixture.unit=tokens"])
    by_tokens = plan.build_plan(cfg_tokens, data_tokens, weights, "--weights", world_size=4)
    drawn = np.array([d.tokens for d in by_tokens.domains])
    assert sum(d.samples for d in by_tokens.domains) == 240
    assert drawn[0] / drawn.sum() == pytest.approx(0.75, abs=0.02)
    assert by_tokens.domains[1].samples < 60  # b's examples are longer, so fewer of them make a quarter of the tokens


def test_config_strategies_and_distribution(tmp_path, tiny_model_dir, tokenizer) -> None:
    config = _write_config(tmp_path, tiny_model_dir, {"a": _rows("a", 30, 3), "b": _rows("b", 20, 12)})
    cfg, data = _prepare(config, tokenizer)
    weights, source = plan.config_weights(cfg, data.domains, data)
    assert weights.tolist() == [0.5, 0.5] and source == "strategy uniform"
    versatune, _ = _prepare(config, tokenizer, ["mixture.strategy=versatune"])
    with pytest.raises(UserError, match="run `versatune-ds probe` first or pass --weights"):
        plan.config_weights(versatune, data.domains, data)
    distribution = tmp_path / "distribution.json"
    distribution.write_text(json.dumps({"domains": ["b", "a"], "p": [0.9, 0.1]}), encoding="utf-8")
    with_p, _ = _prepare(config, tokenizer, ["mixture.strategy=versatune", f"mixture.distribution={distribution}"])
    weights, source = plan.config_weights(with_p, data.domains, data)
    assert weights == pytest.approx([0.1, 0.9]) and "distribution" in source


def test_weights_errors(tmp_path, tiny_model_dir, tokenizer) -> None:
    cfg, data = _prepare(_write_config(tmp_path, tiny_model_dir, {"a": _rows("a", 10, 2), "b": _rows("b", 10, 2)}), tokenizer)
    with pytest.raises(UserError, match="--weights: unknown domain\\(s\\) law; known domains: a, b"):
        plan.parse_weights("a=1,b=1,law=1", data.domains)
    with pytest.raises(UserError, match="missing value\\(s\\) for domain\\(s\\) b"):
        plan.parse_weights("a=1", data.domains)
    with pytest.raises(UserError, match="'a=x' is not name=number"):
        plan.parse_weights("a=x,b=1", data.domains)


def test_plan_command_prints_a_table_and_writes_json(tmp_path, tiny_model_dir, capsys) -> None:
    config = _write_config(tmp_path, tiny_model_dir, {"a": _rows("a", 30, 3), "b": _rows("b", 20, 12)})
    out = tmp_path / "plan.json"
    code = cli.main(["plan", "--config", str(config), "--weights", "a=0.25,b=0.75", "--world-size", "2", "--json", str(out),
                     "train.max_steps=5"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "rows drawn" in printed and "total" in printed
    document = json.loads(out.read_text(encoding="utf-8"))
    assert document["total_samples"] == 5 * 2 * 3 * 2 and document["weights_from"] == "--weights"
    assert [d["name"] for d in document["domains"]] == ["a", "b"]
    assert sum(d["samples"] for d in document["domains"]) == 60
    # A user mistake is one message and exit code 2.
    assert cli.main(["plan", "--config", str(config), "--weights", "c=1"]) == 2
    assert "unknown domain(s) c" in capsys.readouterr().err


def test_plan_over_the_real_sft_files(tmp_path, tiny_model_dir, tokenizer, shared_data) -> None:
    """Per-domain example and token counts over (the first 120 rows of) every real sft/ file match a direct count."""
    domains = {}
    for path in sorted((shared_data / "sft").glob("*.jsonl")):
        lines = path.read_text(encoding="utf-8").split("\n")[:120]  # not splitlines(): rows may hold U+2028
        domains[path.stem] = [json.loads(line) for line in lines]
    config = _write_config(tmp_path, tiny_model_dir, domains, data={"seq_len": 16384})
    cfg, data = _prepare(config, tokenizer)
    result = plan.build_plan(cfg, data, np.full(len(domains), 1 / len(domains)), "test", world_size=1)
    assert [d.name for d in result.domains] == sorted(domains)
    for domain_plan, domain_data, rows in zip(result.domains, data.per_domain, domains.values()):
        direct = 0
        for row in rows:
            user = row["instruction"] + ("\n" + row["input"] if row["input"] else "")  # joined as LLaMA-Factory does
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
            direct += len(tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])
        assert domain_plan.train_examples + domain_plan.heldout_examples == len(rows)
        assert domain_plan.train_tokens + sum(e.num_tokens for e in domain_data.heldout) == direct
