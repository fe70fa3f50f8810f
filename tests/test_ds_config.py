"""DeepSpeed config: shipped files, run-config injection, 'auto' / batch / block refusals, path rules, check-config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from versatune_ds.config.loading import load_config
from versatune_ds.engine.ds_config import build_ds_config, load_ds_json, resolve_ds_config_path
from versatune_ds.errors import UserError
from versatune_ds.resources import shipped_path

DS_CONFIG_DIR = shipped_path("ds_configs")

SHIPPED = ("zero2.json", "zero3.json", "zero3_offload_optimizer.json", "zero3_offload.json", "zero3_offload_nvme.json")


def _cfg(tmp_path: Path, ds: dict | str, *overrides: str):
    data = tmp_path / "a.jsonl"
    data.write_text('{"instruction": "x", "input": "", "output": "y"}\n')
    if isinstance(ds, dict):
        ds_path = tmp_path / "ds.json"
        ds_path.write_text(json.dumps(ds, indent=2))
        ds = str(ds_path)
    return load_config(None, [f"model.path={tmp_path}", f"data.domains=[{{name: a, train: [{data}]}}]", f"deepspeed.config={ds}", *overrides])


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_hold_only_deepspeed_settings(name: str) -> None:
    data = load_ds_json(DS_CONFIG_DIR / name)  # no "auto", no optimizer/scheduler/clipping
    assert "zero_optimization" in data
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16", "fp16"):
        assert key not in data


def test_injects_batch_clipping_precision(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "zero3.json", "train.micro_batch_size=3", "train.gradient_accumulation_steps=5",
               "train.max_grad_norm=0.5", "model.dtype=bf16")
    ds = build_ds_config(cfg, 4, cuda=False)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 5, 60)
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.parametrize("cuda, expected", [(False, "fp32"), (True, "bf16")])
def test_auto_dtype_is_bf16_on_gpu_fp32_on_cpu(tmp_path: Path, cuda: bool, expected: str) -> None:
    ds = build_ds_config(_cfg(tmp_path, "zero2.json"), 1, cuda=cuda)
    assert ds["bf16"]["enabled"] == (expected == "bf16") and not ds["fp16"]["enabled"]


def test_auto_value_is_refused_naming_key_and_file(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}})
    with pytest.raises(UserError, match=r"ds\.json sets zero_optimization\.reduce_bucket_size to \"auto\""):
        build_ds_config(cfg, 2)


def test_batch_size_mismatch_is_refused(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"zero_optimization": {"stage": 2}, "train_batch_size": 16}, "train.micro_batch_size=4")
    with pytest.raises(UserError, match=r"train_batch_size=16, but micro_batch_size 4 x gradient_accumulation_steps 1 x world size 2 = 8"):
        build_ds_config(cfg, 2)
    assert build_ds_config(cfg, 4)["train_batch_size"] == 16  # consistent numbers are accepted


def test_micro_batch_in_json_must_agree(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"train_micro_batch_size_per_gpu": 8}, "train.micro_batch_size=4")
    with pytest.raises(UserError, match=r"train_micro_batch_size_per_gpu=8 but the run config gives 4 \(train\.micro_batch_size\)"):
        build_ds_config(cfg, 1)


@pytest.mark.parametrize("block, hint", [("optimizer", "train.learning_rate"), ("scheduler", "train.lr_scheduler"),
                                         ("gradient_clipping", "train.max_grad_norm")])
def test_blocks_owned_by_the_run_config_are_refused(tmp_path: Path, block: str, hint: str) -> None:
    cfg = _cfg(tmp_path, {block: {"type": "AdamW"} if block != "gradient_clipping" else 1.0})
    with pytest.raises(UserError, match=hint):
        build_ds_config(cfg, 1)


def test_precision_conflict_is_refused(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"bf16": {"enabled": True}}, "model.dtype=fp32")
    with pytest.raises(UserError, match="bf16.enabled=True but model.dtype resolves to fp32"):
        build_ds_config(cfg, 1)


def test_nvme_placeholder_must_be_set(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "zero3_offload_nvme.json")
    with pytest.raises(UserError, match=r"offload_optimizer\.nvme_path is '/SET/ME/local_nvme', a placeholder; set deepspeed\.nvme_path="):
        build_ds_config(cfg, 1)
    with pytest.raises(UserError, match="does not exist"):
        build_ds_config(_cfg(tmp_path, "zero3_offload_nvme.json", f"deepspeed.nvme_path={tmp_path / 'nope'}"), 1)
    ds = build_ds_config(_cfg(tmp_path, "zero3_offload_nvme.json", f"deepspeed.nvme_path={tmp_path}"), 1)
    assert ds["zero_optimization"]["offload_param"]["nvme_path"] == str(tmp_path)


def test_path_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_ds_config_path("zero3.json") == DS_CONFIG_DIR / "zero3.json"  # bare name: the shipped ds_configs/
    assert resolve_ds_config_path("zero3") == DS_CONFIG_DIR / "zero3.json"  # ... with or without .json
    monkeypatch.chdir(tmp_path)
    assert resolve_ds_config_path("ds_configs/zero2.json") == DS_CONFIG_DIR / "zero2.json"  # falls back to the shipped files
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero2.json").write_text("{}")
    assert resolve_ds_config_path("ds_configs/zero2.json") == tmp_path / "ds_configs" / "zero2.json"  # cwd first
    with pytest.raises(UserError, match=r"file not found: nope\.json .*zero3"):
        resolve_ds_config_path("nope.json")


def test_bad_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "a": 1,\n  oops\n}')
    with pytest.raises(UserError, match=r"bad\.json:3: not valid JSON"):
        load_ds_json(path)


def test_check_config_prints_resolved_config_and_ds_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from versatune_ds.cli import main

    data = tmp_path / "a.jsonl"
    data.write_text("{}\n")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(tmp_path)}, "data": {"domains": [{"name": "a", "train": str(data)}]},
                                      "deepspeed": {"config": "zero2.json"}}))
    assert main(["check-config", "--config", str(config), "train.micro_batch_size=2", "--world-size", "3"]) == 0
    out = capsys.readouterr().out
    resolved, ds_text = out.split("# DeepSpeed config (world size 3)\n")
    assert yaml.safe_load(resolved)["train"]["micro_batch_size"] == 2
    ds = json.loads(ds_text)
    assert ds["train_batch_size"] == 6 and ds["zero_optimization"]["stage"] == 2


def test_check_config_reports_a_bad_batch_as_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from versatune_ds.cli import main

    cfg_ds = tmp_path / "ds.json"
    cfg_ds.write_text(json.dumps({"train_batch_size": 7}))
    data = tmp_path / "a.jsonl"
    data.write_text("{}\n")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(tmp_path)}, "data": {"domains": [{"name": "a", "train": str(data)}]},
                                      "deepspeed": {"config": str(cfg_ds)}}))
    assert main(["check-config", "--config", str(config)]) == 2
    assert "train_batch_size=7" in capsys.readouterr().err
