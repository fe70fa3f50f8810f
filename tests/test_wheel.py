"""The wheel works outside the checkout: shipped DeepSpeed configs, examples and launchers come with it.

Builds the wheel, installs it (without dependencies) into a fresh virtual environment that borrows the
test environment's packages through a plain path entry, and runs the CLI from a folder far from the
checkout, so nothing can be found through the source tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_installed_wheel_runs_check_config_and_estimate_memory_outside_the_checkout(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    # Build from a copy: an in-tree build/ folder left by an earlier build could carry stale modules.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info", "__pycache__"))
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)], tmp_path, env)
    (wheel,) = wheels.glob("versatune_ds-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp_path, env)
    # Dependencies (torch, deepspeed, transformers...) from the test environment, as a plain path entry: its
    # .pth files (the editable install of the checkout among them) are not processed.
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).stdout.strip())
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([str(python), "-c", "import versatune_ds; print(versatune_ds.__file__)"], work, env).stdout.strip()
    assert where.startswith(str(site)), where

    cli = str(venv / "bin" / "versatune-ds")
    _run([cli, "init", "project"], work, env)
    project = work / "project"
    assert (project / "configs" / "sample_tiny.yaml").is_file() and (project / "launchers" / "torchrun.sh").is_file()
    assert (project / "data" / "sample" / "law.jsonl").is_file()
    checked = _run([cli, "check-config", "--config", "project/configs/sample_tiny.yaml", "--world-size", "2"], work, env)
    assert '"train_batch_size": 8' in checked.stdout  # micro 4 x accumulation 1 x 2 ranks
    assert f"{site}/versatune_ds/_shipped/ds_configs/zero3.json" in checked.stderr  # the wheel's copy, by name
    # A second init into the same folder would overwrite files: refused.
    refused = subprocess.run([cli, "init", "project"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "already exist" in refused.stderr

    model_config = work / "llama.json"
    model_config.write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000,
    }))
    estimated = _run([cli, "estimate-memory", "--model", str(model_config), "--nodes", "1", "--gpus-per-node", "2", "--json"], work, env)
    assert json.loads(estimated.stdout)["model"]["total_params"] > 0
