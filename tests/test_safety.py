"""Safe defaults: no remote code unless asked, no unpickling of arbitrary objects, data paths reported,
secrets never written to the run directory or the logs."""

from __future__ import annotations

import ast
import json
import logging
import pickle
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "versatune_ds"


def _cfg(tmp_path: Path, model_dir: Path, *overrides: str):
    from versatune_ds.config.loading import load_config

    data = tmp_path / "a.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."}) + "\n")
    return load_config(None, [f"model.path={model_dir}", f"data.domains=[{{name: a, train: [{data}]}}]", *overrides])


# ----------------------------------------------------------------------------------------------
# trust_remote_code


class _Recorder:
    def __init__(self, result: object = None) -> None:
        self.kwargs: list[dict] = []
        self.result = result

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.kwargs.append(kwargs)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.mark.parametrize(("overrides", "expected"), [((), False), (("model.trust_remote_code=true",), True)])
def test_trust_remote_code_is_off_unless_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: tuple, expected: bool) -> None:
    import transformers

    from versatune_ds.data.tokenizer import load_tokenizer
    from versatune_ds.engine.models import load_inference_model, load_model

    cfg = _cfg(tmp_path, tmp_path, *overrides)
    stop = OSError("recorded")  # every loader turns it into a UserError after the call we want to see
    tokenizer_calls, model_calls = _Recorder(stop), _Recorder(stop)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer_calls)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_calls)
    from versatune_ds.dist import DistEnv
    from versatune_ds.errors import UserError

    env = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=1, launcher="single")
    for load in (lambda: load_tokenizer(cfg.model), lambda: load_model(cfg.model), lambda: load_inference_model(cfg.model, env, zero3=False)):
        with pytest.raises(UserError):
            load()
    assert [k["trust_remote_code"] for k in tokenizer_calls.kwargs] == [expected]
    assert [k["trust_remote_code"] for k in model_calls.kwargs] == [expected, expected]


def test_trust_remote_code_defaults_to_false_in_the_config() -> None:
    from versatune_ds.config.schema import ModelConfig

    assert ModelConfig().trust_remote_code is False


def test_every_from_pretrained_of_a_model_or_tokenizer_passes_trust_remote_code() -> None:
    """Static check: transformers' own default may change; we always say what we mean."""
    missing = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value
            owner_name = owner.id if isinstance(owner, ast.Name) else ""
            if node.func.attr in ("from_pretrained", "from_config") and owner_name.startswith("Auto") and owner_name != "AutoConfig" or (
                node.func.attr == "from_pretrained" and owner_name == "AutoConfig"
            ):
                if not any(k.arg == "trust_remote_code" or k.arg is None for k in node.keywords):
                    missing.append(f"{path.name}:{node.lineno}")
    assert missing == []


# ----------------------------------------------------------------------------------------------
# No unpickling of arbitrary objects


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called == name:
                found.append(node)
    return found


def test_the_package_never_unpickles_arbitrary_objects() -> None:
    problems = []
    for path in sorted(PACKAGE.glob("*.py")):
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                for name in names:
                    if name.split(".")[0] in ("pickle", "joblib", "dill", "cloudpickle", "shelve"):
                        problems.append(f"{path.name}:{node.lineno} imports {name}")
        for call in _calls(tree, "load"):
            if isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name) and call.func.value.id == "torch":
                flag = [k for k in call.keywords if k.arg == "weights_only"]
                if not flag or not (isinstance(flag[0].value, ast.Constant) and flag[0].value.value is True):
                    problems.append(f"{path.name}:{call.lineno} torch.load without weights_only=True")
            if isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name) and call.func.value.id == "np":
                flag = [k for k in call.keywords if k.arg == "allow_pickle"]
                if flag and not (isinstance(flag[0].value, ast.Constant) and flag[0].value.value is False):
                    problems.append(f"{path.name}:{call.lineno} np.load with allow_pickle")
    assert problems == []


def _inside_weights_only_loading(tree: ast.AST, call: ast.Call) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(
            isinstance(item.context_expr, ast.Call) and getattr(item.context_expr.func, "id", getattr(item.context_expr.func, "attr", "")) == "weights_only_loading"
            for item in node.items
        ):
            if any(inner is call for inner in ast.walk(node)):
                return True
    return False


# TrainEngine.load is the thin wrapper checkpoint.load_checkpoint calls inside weights_only_loading().
ALLOWED_UNWRAPPED = {("engine.py", "load_checkpoint")}


def test_deepspeed_checkpoint_loads_run_under_weights_only_loading() -> None:
    """DeepSpeed's loaders call torch.load(weights_only=False); every use of them is wrapped."""
    problems = []
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name in ("load_checkpoint", "get_fp32_state_dict_from_zero_checkpoint"):
            for call in _calls(tree, name):
                is_deepspeed = name != "load_checkpoint" or (isinstance(call.func, ast.Attribute) and "engine" in ast.unparse(call.func.value))
                if is_deepspeed and (path.name, name) not in ALLOWED_UNWRAPPED and not _inside_weights_only_loading(tree, call):
                    problems.append(f"{path.name}:{call.lineno} {name} outside weights_only_loading()")
    assert problems == []


class _Payload:
    """Unpickling this would call os.system: what a doctored checkpoint would do."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_weights_only_loading_refuses_a_doctored_file_and_reads_real_ones(tmp_path: Path) -> None:
    import torch

    from versatune_ds.engine.zero import weights_only_loading

    doctored = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "evil": _Payload()}, doctored)
    plain = tmp_path / "plain.pt"
    torch.save({"module": {"w": torch.ones(2)}, "step": 3}, plain)
    original = torch.load
    with weights_only_loading():
        # DeepSpeed's own call, verbatim: weights_only=False is overridden.
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            torch.load(doctored, map_location="cpu", weights_only=False)
        assert torch.load(plain, map_location="cpu", weights_only=False)["step"] == 3
        from deepspeed.runtime.zero.config import ZeroStageEnum

        torch.save({"zero_stage": ZeroStageEnum.weights}, tmp_path / "ds.pt")
        assert torch.load(tmp_path / "ds.pt", weights_only=False)["zero_stage"] == ZeroStageEnum.weights
    assert torch.load is original


def test_a_doctored_checkpoint_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    import torch

    from versatune_ds.dist import DistEnv
    from versatune_ds.engine import checkpoint
    from versatune_ds.errors import UserError

    env = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=1, launcher="single")

    class Engine:
        """Loads like DeepSpeed's TorchCheckpointEngine (weights_only=False)."""

        def save(self, directory: str, tag: str, client_state: dict) -> None:
            folder = Path(directory) / tag
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"client": client_state, "evil": _Payload()}, folder / "mp_rank_00_model_states.pt")

        def load(self, directory: str, tag: str) -> dict:
            return torch.load(Path(directory) / tag / "mp_rank_00_model_states.pt", weights_only=False)["client"]

    folder = checkpoint.save_checkpoint(Engine(), tmp_path, step=2, state={}, keep_last=1, env=env)
    with pytest.raises(UserError, match=r"could not load checkpoint .*step_00000002: UnpicklingError"):
        checkpoint.load_checkpoint(Engine(), folder, env)


def test_our_resumable_state_is_json_not_pickle(tmp_path: Path) -> None:
    """Sampler, schedule, policy, RNG: JSON files in the tag folder; DeepSpeed's client_state holds only the step."""
    from versatune_ds.dist import DistEnv
    from versatune_ds.engine import checkpoint

    env = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=1, launcher="single")
    seen: dict = {}

    class Engine:
        def save(self, directory: str, tag: str, client_state: dict) -> None:
            seen.update(client_state)
            (Path(directory) / tag).mkdir(parents=True, exist_ok=True)

    state = {"sampler": {"consumed": 8}, "policy": {"weights": [0.5, 0.5]}, "schedule": {"stages": []}}
    folder = checkpoint.save_checkpoint(Engine(), tmp_path, step=4, state=state, keep_last=1, env=env)
    assert seen == {"versatune_step": 4}
    document = json.loads((folder / checkpoint.STATE_FILE).read_text())
    assert document["sampler"] == {"consumed": 8} and document["policy"] == {"weights": [0.5, 0.5]}
    assert set(json.loads((folder / "rng_rank0.json").read_text())) >= {"python", "numpy", "torch"}


# ----------------------------------------------------------------------------------------------
# Data paths: resolved and reported


def test_data_paths_are_resolved_against_the_config_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from versatune_ds.config.loading import load_config
    from versatune_ds.data.prepare import log_data_sources

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "law.jsonl").write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    config = tmp_path / "configs" / "run.yaml"
    config.parent.mkdir()
    config.write_text(f"model: {{path: {tmp_path}}}\ndata:\n  domains:\n    - {{name: law, train: [../data/law.jsonl]}}\n")
    cfg = load_config(config)
    with caplog.at_level(logging.INFO, logger="versatune_ds.data.prepare"):
        log_data_sources(cfg.data)
    assert f"domain law train data: {(tmp_path / 'data' / 'law.jsonl').resolve()}" in caplog.text


# ----------------------------------------------------------------------------------------------
# Secrets never reach the run directory or the logs


SECRETS = {
    "WANDB_API_KEY": "wandb-secret-0123456789abcdef0123456789abcdef01234567",
    "HF_TOKEN": "hf_SECRETtokenFORtestsONLYxxxxxxxxxxxx",
    "HUGGING_FACE_HUB_TOKEN": "hf_SECRETtokenTWOforTESTSonlyyyyyyyyy",
    "AWS_SECRET_ACCESS_KEY": "aws/SECRET+key/for/tests/only/zzzzzzzzzz",
}


@pytest.mark.dist
def test_secrets_in_the_environment_are_never_written(tmp_path: Path, tiny_model_dir: Path) -> None:
    from dist_helpers import launch, write_run_config

    run_dir = tmp_path / "run"
    config = write_run_config(tmp_path / "cfg", tiny_model_dir, run_dir, stage=3,
                              train={"max_steps": 2, "log_every": 1}, checkpoint={"every": 2}, eval={"every": 2},
                              logging={"tensorboard": True}, dist={"timeout_s": 30})
    result = launch(["--log-level", "DEBUG", "train", "--config", str(config)], nproc=1, launcher="single",
                    timeout=300, extra_env=SECRETS)
    assert result.returncode == 0, result.stdout[-4000:]
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in written) and any("tfevents" in p.name for p in written)
    assert any(p.suffix == ".safetensors" for p in written)
    leaks = []
    for name, value in SECRETS.items():
        if value in result.stdout:
            leaks.append(f"{name} in the output")
        leaks += [f"{name} in {p}" for p in written if value.encode() in p.read_bytes()]
    assert leaks == []


# The deepspeed launcher's slurm runner logs `srun ... --export=ALL,MLFLOW_TRACKING_PASSWORD=...`; short
# values (below redaction.MIN_SECRET_CHARS) are only safe in NAME=value form.
LAUNCHER_SECRETS = {
    **SECRETS,
    "MLFLOW_TRACKING_PASSWORD": "mlflow-PASSWORD-for-tests-only-42",
    "MLFLOW_TRACKING_TOKEN": "tok",
    "MY_SERVICE_API_KEY": "sk-test-0123456789abcdefFAKE",
}


def test_redact_takes_out_values_and_assignments() -> None:
    from versatune_ds.redaction import redact

    env = {"HF_TOKEN": "hf_abcdefgh123", "MLFLOW_TRACKING_PASSWORD": "pw1", "TOKENIZERS_PARALLELISM": "false", "HOME": "/root"}
    line = "cmd = srun --export=ALL,MLFLOW_TRACKING_PASSWORD=pw1,PYTHONPATH=/x python -u -m x token hf_abcdefgh123 false /root"
    assert redact(line, env) == "cmd = srun --export=ALL,MLFLOW_TRACKING_PASSWORD=***,PYTHONPATH=/x python -u -m x token *** false /root"
    assert redact('{"HF_TOKEN": "anything"} HF_TOKEN: x', env) == '{"HF_TOKEN": "***"} HF_TOKEN: ***'


def test_log_records_lose_their_secrets(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from versatune_ds import cli

    monkeypatch.setenv("WANDB_API_KEY", SECRETS["WANDB_API_KEY"])
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        cli._setup_logging("DEBUG")
        logging.getLogger("some.library").debug("environment: %s", {"WANDB_API_KEY": SECRETS["WANDB_API_KEY"]})
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    err = capsys.readouterr().err
    assert "environment:" in err and SECRETS["WANDB_API_KEY"] not in err


@pytest.mark.dist
def test_secrets_never_reach_the_run_directory_through_a_real_launcher(tmp_path: Path, tiny_model_dir: Path) -> None:
    """slurm_deepspeed.sbatch (DeepSpeed's slurm runner, which logs its srun command with every MLFLOW_* export)
    with fake secrets in the environment: no file in the run directory, and nothing on the console, has one."""
    from dist_helpers import write_run_config
    from test_launchers import REPO, launcher_env, run_launcher

    run_dir = tmp_path / "run"
    config = write_run_config(tmp_path / "cfg", tiny_model_dir, run_dir, train={"max_steps": 2}, checkpoint={"every": 2},
                              eval={"every": 2}, logging={"tensorboard": True})
    env = {**launcher_env("slurm_deepspeed.sbatch", tmp_path, REPO, config, run_dir), **LAUNCHER_SECRETS}
    done = run_launcher("slurm_deepspeed.sbatch", env, REPO, ["dist.timeout_s=120"])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    log = next((run_dir / "logs").glob("*.log")).read_text()
    assert "MLFLOW_TRACKING_PASSWORD=***" in log and "MLFLOW_TRACKING_TOKEN=***" in log  # the runner's srun command
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in written) and any("tfevents" in p.name for p in written)
    leaks = []
    for name, value in LAUNCHER_SECRETS.items():
        # a 3-letter value ("tok") is a word in ordinary text: look for it as an assignment only
        needle = value if len(value) >= 6 else f"{name}={value}"
        if needle in done.stdout + done.stderr:
            leaks.append(f"{name} in the output")
        leaks += [f"{name} in {p}" for p in written if needle.encode() in p.read_bytes()]
    assert leaks == []
