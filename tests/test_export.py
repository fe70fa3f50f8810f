"""Export: an HF folder from a live ZeRO-3 engine (all ranks gather, rank 0 writes) and from a checkpoint
(`versatune-ds export`), both reloading with AutoModelForCausalLM and giving the live engine's logits; sharded
output with an index; where `--out` may point (never the run directory); a full disk leaves nothing behind."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from dist_helpers import THIS_FILE, launch
from safetensors.torch import load_file


def test_write_folder_replaces_atomically(tmp_path: Path) -> None:
    from versatune_ds.files import write_folder_atomic as _write_folder

    out = tmp_path / "final"
    _write_folder(out, lambda tmp: (tmp / "a.txt").write_text("1"))
    _write_folder(out, lambda tmp: (tmp / "b.txt").write_text("2"))
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no temporary folders left behind


def test_export_command_refuses_a_folder_without_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from versatune_ds.cli import main

    assert main(["export", "--run-dir", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "config.yaml not found" in capsys.readouterr().err


def _tied_model(tiny_model_dir: Path, out: Path) -> Path:
    """The tiny model with tied input/output embeddings (like SmolLM2): export must keep them tied."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """2 ranks, ZeRO-3: 2 training steps, a checkpoint, `final/` exported by the engine, the engine's logits."""
    out = tmp_path_factory.mktemp("export_two_ranks")
    result = launch(["export", str(tiny_model_dir), str(out)], script=str(THIS_FILE), launcher="torchrun")
    assert result.returncode == 0, result.stdout[-6000:]
    return out


def _logits(folder: Path, ids):  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.numpy()


@pytest.mark.dist
@pytest.mark.parametrize("variant", ["two_ranks", "one_rank_tied"])
def test_export_from_engine_and_from_checkpoint_reload_with_the_engines_logits(
    variant: str, tmp_path: Path, tiny_model_dir: Path, request: pytest.FixtureRequest
) -> None:
    import torch

    if variant == "one_rank_tied":
        tiny_model_dir = _tied_model(tiny_model_dir, tmp_path / "tied_model")
        result = launch(["export", str(tiny_model_dir), str(tmp_path)], script=str(THIS_FILE), launcher="single")
        assert result.returncode == 0, result.stdout[-6000:]
        out = tmp_path
    else:
        out = request.getfixturevalue("two_rank_run")
    engine_logits = np.load(out / "engine_logits.npy")
    ids = torch.as_tensor(np.load(out / "ids.npy"))
    run_dir = out / "run"
    from_checkpoint = tmp_path / "from_checkpoint"
    result = launch(["export", "--run-dir", str(run_dir), "--out", str(from_checkpoint)], launcher="single")
    assert result.returncode == 0, result.stdout[-4000:]

    assert np.abs(_logits(tiny_model_dir, ids) - engine_logits).max() > 1e-3  # training changed the model
    for folder in (run_dir / "final", from_checkpoint):
        for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "versatune_export.json"):
            assert (folder / name).is_file(), f"{folder}/{name}"
        np.testing.assert_allclose(_logits(folder, ids), engine_logits, rtol=0, atol=1e-5)


@pytest.mark.dist
def test_small_shards_get_an_index_and_reload_with_the_same_logits(two_rank_run: Path, tmp_path: Path) -> None:
    import torch

    out = tmp_path / "sharded"
    result = launch(["export", "--run-dir", str(two_rank_run / "run"), "--out", str(out), "--max-shard-size", "40KB"],
                    launcher="single")
    assert result.returncode == 0, result.stdout[-4000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 5 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards and not (out / "model.safetensors").exists()
    for shard in out.glob("model-*.safetensors"):
        tensors = load_file(str(shard))
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 40_000
    ids = torch.as_tensor(np.load(two_rank_run / "ids.npy"))
    np.testing.assert_allclose(_logits(out, ids), np.load(two_rank_run / "engine_logits.npy"), rtol=0, atol=1e-5)
    # bf16 is cast per tensor: the same tensors, half the bytes
    half = tmp_path / "bf16"
    result = launch(["export", "--run-dir", str(two_rank_run / "run"), "--out", str(half), "--dtype", "bf16"], launcher="single")
    assert result.returncode == 0, result.stdout[-4000:]
    fp32, bf16 = load_file(str(out / shards[0])), load_file(str(half / "model.safetensors"))
    assert all(bf16[name].dtype == torch.bfloat16 for name in bf16)
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    for name, tensor in fp32.items():
        torch.testing.assert_close(bf16[name], tensor.to(torch.bfloat16), rtol=0, atol=0)


def _fake_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "runs" / "r1"
    (run_dir / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model: {path: nowhere}\n")
    (run_dir / "metrics.jsonl").write_text("{}\n")
    return run_dir


@pytest.mark.parametrize(
    ("target", "force", "message"),
    [
        ("run", True, "would replace .*r1 .*not even with --force"),
        ("runs", True, "would replace .*r1"),
        ("checkpoints", True, "would replace .*checkpoints"),
        ("checkpoints/step_00000002", True, "would replace .*checkpoints"),
        ("unrelated", False, "non-empty folder that is not an earlier versatune-ds export .*--force"),
        ("a_file", True, "is a file, not a folder"),
    ],
)
def test_export_refuses_to_replace_what_is_not_an_earlier_export(
    target: str, force: bool, message: str, tmp_path: Path, run_cli  # type: ignore[no-untyped-def]
) -> None:
    run_dir = _fake_run(tmp_path)
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "notes.txt").write_text("mine")
    (tmp_path / "a_file").write_text("mine")
    out = {"run": run_dir, "runs": run_dir.parent, "checkpoints": run_dir / "checkpoints",
           "checkpoints/step_00000002": run_dir / "checkpoints" / "step_00000002"}.get(target, tmp_path / target)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, _, err = run_cli(["export", "--run-dir", str(run_dir), "--out", str(out), *(["--force"] if force else [])])
    assert code == 2 and "Traceback" not in err
    assert re.search(message, err), err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing touched


def test_export_accepts_an_empty_folder_an_earlier_export_and_force(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    run_dir = _fake_run(tmp_path)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "versatune_export.json").write_text("{}")
    (earlier / "model.safetensors").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "notes.txt").write_text("mine")
    for out, extra in ((earlier, []), (tmp_path / "empty", []), (tmp_path / "unrelated", ["--force"]), (run_dir / "export", [])):
        code, _, err = run_cli(["export", "--run-dir", str(run_dir), "--out", str(out), *extra])
        # past the target check (the fake run then fails on its config): no word about --out
        assert code == 2 and "--out" not in err and "problem(s) in" in err, (out, err)


@pytest.mark.dist
def test_full_disk_during_export_leaves_nothing_behind_and_keeps_the_earlier_export(two_rank_run: Path, tmp_path: Path) -> None:
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    # The tiny model's fp32 export is ~0.6 MB: one fits in 1 MB, a second copy beside it does not.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1000k", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        out = mount_point / "model"
        args = ["export", "--run-dir", str(two_rank_run / "run"), "--out", str(out), "--dtype", "fp32"]
        result = launch(args, launcher="single")
        assert result.returncode == 0, result.stdout[-4000:]
        first = {p.name: p.read_bytes() for p in out.iterdir()}
        result = launch([*args, "--max-shard-size", "100KB"], launcher="single")
        assert result.returncode == 2, result.stdout[-4000:]
        assert "Traceback" not in result.stdout
        assert f"could not write the export to {out}" in result.stdout and "No space left on device" in result.stdout
        assert "Nothing was left behind" in result.stdout
        assert [p.name for p in mount_point.iterdir()] == ["model"]  # no temporary folder or file
        assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # the earlier export is intact
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)

