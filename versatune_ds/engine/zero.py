"""Every DeepSpeed call of the engine in one place (the process group is started in `versatune_ds.dist`).

`deepspeed` is imported inside these functions: importing it costs seconds and JIT-builds nothing until an op
is used, so commands that never touch it (`--help`, `plan`, `report`) stay fast.

DeepSpeed's own checkpoint files are torch pickles that DeepSpeed 0.19 loads with `weights_only=False` (any
object, i.e. any code). Every load here runs under `weights_only_loading()`, which forces
`weights_only=True` and allows only the few DeepSpeed types its files hold.
"""

from __future__ import annotations

import importlib
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Iterable, Iterator

import torch

# The only non-tensor types DeepSpeed 0.19 pickles into its checkpoint files (ZeRO 0-3, fp32/bf16/fp16).
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


@contextmanager
def weights_only_loading() -> Iterator[None]:
    """Inside: every `torch.load` runs with weights_only=True, allowing only DEEPSPEED_SAFE_GLOBALS.

    DeepSpeed's loaders (its checkpoint engine, zero_to_fp32) pass weights_only=False, i.e. unpickle any
    object; tensors, containers and the listed DeepSpeed types are all its files hold.
    """
    allowed = []
    for dotted in DEEPSPEED_SAFE_GLOBALS:
        module_name, _, name = dotted.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module_name), name))
        except (ImportError, AttributeError):
            continue  # another DeepSpeed version: a file holding it is refused with a clear error
    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        torch.load = original


def initialize_training(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, ds_config: dict[str, Any]
) -> Any:
    """`deepspeed.initialize` with our client optimizer and LR schedule; returns the DeepSpeed engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def initialize_inference(model: torch.nn.Module, ds_config: dict[str, Any]) -> Any:
    """`deepspeed.initialize` without an optimizer (ZeRO-3 partitioned inference); returns the engine."""
    import deepspeed

    config = {k: v for k, v in ds_config.items() if k != "zero_force_ds_cpu_optimizer"}
    engine, _, _, _ = deepspeed.initialize(model=model, config=config)
    return engine


def cpu_adam(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
    """DeepSpeed's vectorised CPU Adam (AdamW mode), for optimizer offload on a GPU machine."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)


def gathered(params: Iterable[torch.nn.Parameter]) -> AbstractContextManager[Any]:
    """Inside: the full values of ZeRO-3 partitioned `params` on every rank (read-only)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def is_partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def fp32_state_dict(checkpoint_root: str, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a ZeRO-1/2/3 checkpoint `checkpoint_root/tag` (any number of saving ranks)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loading():
        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_root, tag=tag)


def load_module_states(engine: Any, checkpoint_root: str, tag: str) -> None:
    """Load only the module weights of a checkpoint into an engine (no optimizer, no LR schedule)."""
    with weights_only_loading():
        engine.load_checkpoint(
            checkpoint_root, tag=tag, load_module_only=True, load_optimizer_states=False, load_lr_scheduler_states=False
        )


def full_gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter's full gradient (fp32, CPU) after the last backward of a step, before the optimizer
    step; a collective under ZeRO-3 (call on ALL ranks). For tests and diagnostics."""
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for name, param in module.named_parameters():
        grad = safe_get_full_grad(param) if param.requires_grad else None
        if grad is not None:
            out[name] = grad.detach().float().cpu()
    return out


def lazy_fp32_state_dict(checkpoint_root: str, tag: str) -> dict[str, Any]:
    """DeepSpeed's lazy zero_to_fp32 state dict (values with `.contiguous()`), files read with weights_only=True."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loading():
        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_root, tag=tag, lazy_mode=True)
