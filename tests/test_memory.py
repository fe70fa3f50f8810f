"""estimate-memory: parameters counted on the meta device from a config alone, DeepSpeed's estimators."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from versatune_ds.engine.memory import ModelSize, count_parameters, estimate_memory

LLAMA3_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
    "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def llama70b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama3_70b")
    (folder / "config.json").write_text(json.dumps(LLAMA3_70B))
    return folder


def test_counts_llama3_70b_without_weights(llama70b: Path) -> None:
    size = count_parameters(str(llama70b / "config.json"))
    assert size.total_params == 70_553_706_496
    assert size.largest_layer_params == 128256 * 8192  # an embedding (or lm_head) matrix


def test_counts_the_tiny_model_exactly(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert count_parameters(str(tiny_model_dir)).total_params == sum(p.numel() for p in model.parameters())


def test_zero3_and_offload_shrink_gpu_memory() -> None:
    size = ModelSize(total_params=70_000_000_000, largest_layer_params=1_000_000_000)
    by_label = {e.label: e for e in estimate_memory(size, nodes=4, gpus_per_node=8)}
    zero2, zero3 = by_label["ZeRO-2"], by_label["ZeRO-3"]
    offload = by_label["ZeRO-3 + offload params & optimizer to CPU"]
    assert zero3.gpu_bytes_per_gpu < zero2.gpu_bytes_per_gpu
    assert offload.gpu_bytes_per_gpu < zero3.gpu_bytes_per_gpu and offload.host_bytes_per_node > zero3.host_bytes_per_node
    # ZeRO-3 without offload: 18 bytes per parameter over 32 GPUs, plus DeepSpeed's largest-layer term.
    assert zero3.gpu_bytes_per_gpu >= 18 * 70e9 / 32
    more_nodes = {e.label: e for e in estimate_memory(size, nodes=8, gpus_per_node=8)}
    assert more_nodes["ZeRO-3"].gpu_bytes_per_gpu < zero3.gpu_bytes_per_gpu


def test_command_prints_a_table_and_json(llama70b: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from versatune_ds.cli import main

    assert main(["estimate-memory", "--model", str(llama70b), "--nodes", "2", "--gpus-per-node", "8", "--offload", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["total_params"] == 70_553_706_496
    assert {e["label"] for e in out["estimates"]} == {
        "ZeRO-2 + offload optimizer to CPU", "ZeRO-3 + offload optimizer to CPU", "ZeRO-3 + offload params & optimizer to CPU"}
    assert main(["estimate-memory", "--model", str(llama70b)]) == 0
    table = capsys.readouterr().out
    assert "70.554B parameters" in table and "ZeRO-3 + offload params & optimizer to CPU" in table


def test_missing_model_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from versatune_ds.cli import main

    assert main(["estimate-memory", "--model", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_preflight_warns_when_the_machine_is_too_small(llama70b: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from versatune_ds.config.loading import load_config
    from versatune_ds.dist import DistEnv
    from versatune_ds.engine.memory import preflight_warning

    cfg = load_config(None, [f"model.path={llama70b}", f"data.domains=[{{name: a, train: [{llama70b / 'config.json'}]}}]"])
    env = DistEnv(rank=0, world_size=2, local_rank=0, master_addr="127.0.0.1", master_port=1, launcher="torch")
    with caplog.at_level(logging.WARNING, logger="versatune_ds.engine.memory"):
        message = preflight_warning(cfg, {"zero_optimization": {"stage": 3}}, env)
    assert message is not None and "looks too small" in message and "70.55B parameters" in message
