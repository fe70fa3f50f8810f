"""The one model loader, for training, evaluation, the probe, the LLM judge and the reference model.

`load_model(model_cfg, ds_config=...)` builds the Hugging Face causal LM of a `ModelConfig`. Under ZeRO-3 a
`transformers.integrations.HfDeepSpeedConfig` must be alive while the model is built, so transformers
creates it inside `deepspeed.zero.Init` and every rank holds only its shard from the start (a bare
`zero.Init()` around the constructor crashes in transformers 5, CPU_FACTS.md). The object is stored on
the model so it lives as long as the model does (transformers keeps only a weak reference).

`load_inference_model(model_cfg, env, zero3=...)` is the no-optimizer variant every reader of a model uses:
a full replica per rank on its device, or a ZeRO-3 partitioned model under an inference-only DeepSpeed
config (`inference_ds_config`, the one copy of it), optionally with a DeepSpeed checkpoint's weights on top.

The precision names (`bf16 | fp16 | fp32 | auto`) are resolved here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from transformers.utils import is_flash_attn_2_available

from versatune_ds import dist
from versatune_ds.config.schema import ModelConfig
from versatune_ds.engine import zero
from versatune_ds.errors import UserError

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype_name(dtype: str, *, cuda: bool | None = None) -> str:
    """`model.dtype` / `export.dtype` as one of bf16 | fp16 | fp32 (auto: bf16 with CUDA, fp32 without)."""
    if dtype != "auto":
        return dtype
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return "bf16" if cuda else "fp32"


def torch_dtype(name: str) -> torch.dtype:
    """bf16 | fp16 | fp32 | auto as a torch dtype."""
    return TORCH_DTYPES[resolve_dtype_name(name)]


def resolve_attn_implementation(requested: str) -> str:
    """`auto`: flash_attention_2 when the package is importable and CUDA is there, else sdpa."""
    if requested != "auto":
        return requested
    return "flash_attention_2" if torch.cuda.is_available() and is_flash_attn_2_available() else "sdpa"


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def inference_ds_config(dtype: torch.dtype, *, world_size: int, offload_param: dict[str, Any] | None = None) -> dict[str, Any]:
    """A DeepSpeed config for a ZeRO-3 model without an optimizer: every parameter partitioned.

    `offload_param` (the training config's block) keeps parameters on the CPU as training does, so a
    reference model never needs more accelerator memory than the model being trained.
    """
    zero_cfg: dict[str, Any] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if offload_param:
        zero_cfg["offload_param"] = dict(offload_param)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": world_size,
        "zero_optimization": zero_cfg,
        "steps_per_print": 1_000_000,
    }
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        config["fp16"] = {"enabled": True}
    return config


def load_model(model_cfg: ModelConfig, *, ds_config: dict[str, Any] | None = None, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The causal LM of `model_cfg`; partitioned at load when `ds_config` is ZeRO-3 (call on every rank).

    Under ZeRO-3 call after the process group is up (partitioning is collective).
    """
    dtype = dtype if dtype is not None else torch_dtype(model_cfg.dtype)
    keeper = HfDeepSpeedConfig(ds_config) if ds_config is not None and zero_stage(ds_config) == 3 else None
    if keeper is None:
        # A ZeRO-3 model loaded earlier in this process (a probe, a reference) would otherwise make
        # transformers partition this one too: its HfDeepSpeedConfig is a process-wide weak reference.
        unset_hf_deepspeed_config()
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": model_cfg.trust_remote_code,
        "attn_implementation": resolve_attn_implementation(model_cfg.attn_implementation),
    }
    if model_cfg.gguf_file:
        kwargs["gguf_file"] = model_cfg.gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(model_cfg.path, **kwargs)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
        if dist.is_collective_failure(exc):  # ZeRO-3 partitions while loading: a peer died
            raise
        # Corrupted, truncated or unreadable weight files, a config that does not match them: one line, no traceback.
        raise UserError(
            f"model.path: could not load a causal LM from {model_cfg.path!r} ({type(exc).__name__}: {_first_line(exc)}); "
            "check that its weight files are complete and readable (copy or convert them again)"
        ) from None
    # transformers keeps only a weak reference to the HfDeepSpeedConfig; tie its life to the model's.
    model._versatune_hf_ds_config = keeper  # noqa: SLF001 (our own attribute)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


@dataclass(frozen=True)
class CheckpointRef:
    """A DeepSpeed checkpoint to put on top of the base model: `root/tag/`."""

    root: str
    tag: str


@dataclass
class InferenceModel:
    """A model ready for forward passes and `generate`; keep the object alive while `module` is used."""

    module: torch.nn.Module
    device: torch.device
    keep_alive: Any = None  # the DeepSpeed engine of a ZeRO-3 model


def model_device(env: dist.DistEnv) -> torch.device:
    return torch.device("cuda", env.local_rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")


def load_inference_model(
    model_cfg: ModelConfig,
    env: dist.DistEnv,
    *,
    zero3: bool,
    dtype: torch.dtype | None = None,
    checkpoint: CheckpointRef | None = None,
    offload_param: dict[str, Any] | None = None,
) -> InferenceModel:
    """A model without an optimizer for evaluation and generation: a replica per rank, or ZeRO-3 partitioned.

    Call on every rank. ZeRO-3 needs the process group (`dist.start_process_group`); every forward is then
    a collective, so callers keep the ranks in lockstep (DESIGN.md section 4).
    """
    model_cfg = dataclasses.replace(model_cfg, gradient_checkpointing=False)
    dtype = dtype if dtype is not None else torch_dtype(model_cfg.dtype)
    if not zero3:
        module = load_model(model_cfg, dtype=dtype)
        if checkpoint is not None:
            state = zero.fp32_state_dict(checkpoint.root, checkpoint.tag)
            missing, unexpected = module.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if "lm_head" not in k]:
                raise UserError(
                    f"checkpoint {checkpoint.tag}: does not match {model_cfg.path} "
                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
        device = model_device(env)
        return InferenceModel(module.to(device).eval(), device)
    ds_config = inference_ds_config(dtype, world_size=env.world_size, offload_param=offload_param)
    module = load_model(model_cfg, ds_config=ds_config, dtype=dtype)
    engine = zero.initialize_inference(module, ds_config)
    if checkpoint is not None:
        zero.load_module_states(engine, checkpoint.root, checkpoint.tag)
    engine.module.eval()
    return InferenceModel(engine.module, engine.device, keep_alive=engine)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


# Config keys that hold a model's position limit, by architecture family.
_POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "max_seq_len", "seq_length", "n_ctx")


def position_limit(model_cfg: ModelConfig) -> tuple[str, int] | None:
    """(config key, value) of the model's position limit, read from its config alone (no weights); None if unknown."""
    path = Path(model_cfg.path).expanduser()
    if not path.exists():
        return None  # a hub name: the loader reports problems when it fetches the model
    extra = {"gguf_file": model_cfg.gguf_file} if model_cfg.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=model_cfg.trust_remote_code, **extra)
    except Exception as exc:  # noqa: BLE001 -- a check that cannot read the config leaves it to the loader
        logger.debug("position limit not checked: %s", exc)
        return None
    config = getattr(config, "text_config", None) or config
    for key in _POSITION_LIMIT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return getattr(config, "attribute_map", {}).get(key, key), value  # the name config.json uses (GPT-2: n_positions)
    return None


def check_position_limit(model_cfg: ModelConfig, seq_len: int) -> None:
    """Refuse `data.seq_len` beyond the model's positions (GPT-2 would raise IndexError mid-run; Llama would
    train on positions it never saw, without a word)."""
    found = position_limit(model_cfg)
    if found is None or seq_len <= found[1]:
        return
    key, limit = found
    raise UserError(
        f"data.seq_len={seq_len} is longer than the model's position limit: {model_cfg.path} has {key}={limit} in its "
        f"config.json. Set data.seq_len to at most {limit} (packing fills rows of that length), or use a model "
        "with a longer context"
    )
