"""Export: an HF folder from a live ZeRO-3 engine (all ranks gather, rank 0 writes) and from a checkpoint
(`versatune-ds export`), both reloading with AutoModelForCausalLM and giving the live engine's logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dist_helpers import THIS_FILE, launch


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


@pytest.mark.dist
@pytest.mark.parametrize("variant", ["two_ranks", "one_rank_tied"])
def test_export_from_engine_and_from_checkpoint_reload_with_the_engines_logits(
    variant: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    if variant == "one_rank_tied":
        tiny_model_dir = _tied_model(tiny_model_dir, tmp_path / "tied_model")
    launcher = "torchrun" if variant == "two_ranks" else "single"
    result = launch(["export", str(tiny_model_dir), str(tmp_path)], script=str(THIS_FILE), launcher=launcher)
    assert result.returncode == 0, result.stdout[-6000:]
    engine_logits = np.load(tmp_path / "engine_logits.npy")
    ids = torch.as_tensor(np.load(tmp_path / "ids.npy"))
    run_dir = tmp_path / "run"
    from_checkpoint = tmp_path / "from_checkpoint"
    result = launch(["export", "--run-dir", str(run_dir), "--out", str(from_checkpoint)], launcher="single")
    assert result.returncode == 0, result.stdout[-4000:]

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids, use_cache=False).logits.numpy()
    assert np.abs(base_logits - engine_logits).max() > 1e-3  # training changed the model
    for folder in (run_dir / "final", from_checkpoint):
        for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
            assert (folder / name).is_file(), f"{folder}/{name}"
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits.numpy()
        np.testing.assert_allclose(logits, engine_logits, rtol=0, atol=1e-5)
