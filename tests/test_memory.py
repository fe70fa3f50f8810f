"""estimate-memory: the model counted on the meta device from its config alone; the memory model's parts respond to
what they should (ZeRO stage, offload, ranks, checkpointing, loss path); the command reads a run config; the 70B
recipes fit what their comments say; the preflight warns on a small machine."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from versatune_ds.config.loading import load_config
from versatune_ds.engine.memory_model import GIB, estimate, estimate_run, model_shape, run_shape

REPO = Path(__file__).resolve().parents[1]
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


def _cfg(model: Path, *overrides: str):  # type: ignore[no-untyped-def]
    return load_config(None, [f"model.path={model}", "model.dtype=bf16", "data.seq_len=4096", "model.gradient_checkpointing=true",
                              "data.domains=[{name: a, train: [x.jsonl]}]", "train.micro_batch_size=1", *overrides], check_files=False)


def test_counts_llama3_70b_without_weights(llama70b: Path) -> None:
    shape = model_shape(str(llama70b / "config.json"))
    assert shape.total_params == 70_553_706_496
    assert shape.largest_layer_params == 128256 * 8192  # an embedding (or lm_head) matrix
    assert (shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.kv_heads, shape.vocab) == (8192, 28672, 80, 64, 8, 128256)


def test_counts_the_tiny_model_exactly(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model_shape(str(tiny_model_dir)).total_params == sum(p.numel() for p in model.parameters())


def test_the_parts_respond_to_the_setup(llama70b: Path) -> None:
    shape = model_shape(str(llama70b))

    def gpu(*overrides: str, nodes: int = 4, **kwargs):  # type: ignore[no-untyped-def]
        return estimate_run(_cfg(llama70b, *overrides), nodes=nodes, gpus_per_node=8, model=shape, **kwargs)

    zero2, zero3 = gpu("deepspeed.config=zero2"), gpu("deepspeed.config=zero3")
    optimizer_off, all_off = gpu("deepspeed.config=zero3_offload_optimizer"), gpu("deepspeed.config=zero3_offload")
    assert zero3.device_per_rank_bytes < zero2.device_per_rank_bytes
    assert all_off.device_per_rank_bytes < optimizer_off.device_per_rank_bytes < zero3.device_per_rank_bytes
    assert zero3.host_per_node_bytes < optimizer_off.host_per_node_bytes < all_off.host_per_node_bytes
    # ZeRO-3 model states: 2 + 2 + 12 bytes per parameter over 32 GPUs (plus one fp32 sub-group being stepped).
    states = sum(v for k, v in zero3.device_parts.items() if k in ("parameters", "gradients", "fp32 master + Adam moments"))
    assert states == pytest.approx(16 * 70_553_706_496 / 32)
    assert gpu("deepspeed.config=zero3", nodes=8).device_per_rank_bytes < zero3.device_per_rank_bytes
    no_gc = gpu("deepspeed.config=zero3", "model.gradient_checkpointing=false")
    assert no_gc.device_parts["activations"] > 5 * zero3.device_parts["activations"]
    plain = gpu("deepspeed.config=zero3", chunked_loss=False)
    # Full logits of 4096 tokens x 128256 in bf16 with fp32 copies: 2 + 4 + 4 + 4 + 2 bytes each.
    assert plain.device_parts["loss path"] == pytest.approx(4096 * 128256 * 16)
    assert plain.device_parts["loss path"] > 3 * zero3.device_parts["loss path"]
    assert zero3.checkpoint_disk_bytes == 12 * 70_553_706_496  # fp32 master + Adam moments
    assert zero3.export_disk_bytes == 2 * 70_553_706_496


def test_cpu_runs_count_everything_as_host_memory(tiny_model_dir: Path) -> None:
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "model.dtype=fp32", "data.domains=[{name: a, train: [x.jsonl]}]"],
                      check_files=False)
    cpu = estimate_run(cfg, nodes=1, gpus_per_node=2, device="cpu")
    assert cpu.device_parts == {} and cpu.host_parts["process"] > 0
    assert 0.4 * GIB < cpu.host_per_rank_bytes < 1.5 * GIB  # the tiny model: the process itself dominates


@pytest.mark.parametrize(("config", "nodes", "per_gpu_gib", "host_per_node_gib"),
                         [("llama3_70b_zero3.yaml", 4, 70, 100), ("llama3_70b_zero3_offload.yaml", 1, 70, 1000)])
def test_the_70b_recipes_fit_what_they_say(config: str, nodes: int, per_gpu_gib: float, host_per_node_gib: float, llama70b: Path) -> None:
    cfg = load_config(REPO / "configs" / config, [f"model.path={llama70b}"], check_files=False)
    result = estimate_run(cfg, nodes=nodes, gpus_per_node=8)
    assert result.device_per_rank_bytes < per_gpu_gib * GIB  # 80 GB GPUs with headroom
    assert result.host_per_node_bytes < host_per_node_gib * GIB
    # On one node plain ZeRO-3 would not fit an 80 GB GPU: offload is used only where it is needed.
    plain = estimate_run(dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, config="zero3")), nodes=nodes, gpus_per_node=8)
    assert (plain.device_per_rank_bytes < 80e9) == (nodes == 4)


def test_run_shape_reads_the_deepspeed_config(llama70b: Path) -> None:
    shape = run_shape(_cfg(llama70b, "deepspeed.config=zero3_offload"), nodes=2, gpus_per_node=4, device="cuda", model_type="llama")
    assert (shape.stage, shape.offload_optimizer, shape.offload_params, shape.world_size) == (3, True, True, 8)
    assert shape.chunked_loss and shape.param_bytes == 2 and shape.max_live_parameters == 1e9
    assert estimate(model_shape(str(llama70b)), dataclasses.replace(shape, offload_params=False)).host_parts["fp32 master + Adam moments"] > 0


def test_command_prints_a_report_and_json(llama70b: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from versatune_ds.cli import main

    config = REPO / "configs" / "llama3_70b_zero3.yaml"
    assert main(["estimate-memory", "--config", str(config), f"model.path={llama70b}", "--nodes", "4", "--gpus-per-node", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["total_params"] == 70_553_706_496 and out["deepspeed.config"] == "zero3"
    assert [a["setup"] for a in out["alternatives"]] == [
        "ZeRO-2", "ZeRO-3", "ZeRO-3 + optimizer offload", "ZeRO-3 + optimizer and parameter offload"]
    assert out["disk_checkpoints_peak_bytes"] == out["disk_per_checkpoint_bytes"] * 4  # keep_last 3 + one being written
    assert main(["estimate-memory", "--model", str(llama70b / "config.json"), "--nodes", "4"]) == 0
    table = capsys.readouterr().out
    assert "70.554B parameters" in table and "per GPU at its peak" in table and "per checkpoint" in table
    assert "ZeRO-3 + optimizer and parameter offload" in table


def test_missing_model_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from versatune_ds.cli import main

    assert main(["estimate-memory", "--model", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_preflight_warns_when_the_machine_is_too_small(llama70b: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from versatune_ds.dist import DistEnv
    from versatune_ds.engine.memory import preflight_warning

    cfg = load_config(None, [f"model.path={llama70b}", f"data.domains=[{{name: a, train: [{llama70b / 'config.json'}]}}]"])
    env = DistEnv(rank=0, world_size=2, local_rank=0, master_addr="127.0.0.1", master_port=1, launcher="torch")
    with caplog.at_level(logging.WARNING, logger="versatune_ds.engine.memory"):
        message = preflight_warning(cfg, {"zero_optimization": {"stage": 3}}, env)
    assert message is not None and "looks too small" in message and "estimate-memory" in message
