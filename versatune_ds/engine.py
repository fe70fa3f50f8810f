"""The DeepSpeed training engine: model loading, optimizer + LR schedule, one training step, loss sums.

Loading. `load_model` builds the Hugging Face model from a local folder or a hub name. Under ZeRO-3 a
`transformers.integrations.HfDeepSpeedConfig` must be alive while the model is built, so transformers
creates it inside `deepspeed.zero.Init` and every rank holds only its shard from the start (a bare
`zero.Init()` around the constructor crashes in transformers 5, CPU_FACTS.md). The object is stored on
the model so it lives as long as the model does (transformers only keeps a weak reference).

Loss. The loss of a step is the token mean over the whole global batch (all ranks, all accumulation
micro-batches): sum of per-token cross-entropy / number of label tokens. Each micro-batch backwards
`loss_sum * world / global_tokens` without DeepSpeed's division by the accumulation steps; DeepSpeed
averages gradients over ranks, which divides by `world` again. So the gradient is that of the global
token mean whatever the split into ranks and micro-batches, and ZeRO-0/2/3, 1 or 2 ranks, and any
accumulation give the same updates for the same global batch (up to float summation order).

Non-finite steps. A micro-batch whose loss is not finite has its backward poisoned with NaN so the
gradients of every rank turn non-finite (the reduction spreads them); the ranks then agree (a summed flag, like
`dist.any_rank_true`) before the optimizer step. ZeRO-1/2/3 and the bf16 optimizer refuse a step with a
non-finite gradient norm (they clear the gradients and do not touch weights, moments or the LR
schedule); without a ZeRO optimizer (stage 0) we clear the gradients ourselves and do not step.
`was_step_applied()` is checked afterwards, so a DeepSpeed that did step anyway is an error, not a
silently corrupted model.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from versatune_ds import dist
from versatune_ds.ds_config import offloads_optimizer, resolve_dtype_name, zero_stage
from versatune_ds.errors import UserError
from versatune_ds.evaluate import row_loss_sums
from versatune_ds.packing import IGNORE_INDEX

if TYPE_CHECKING:
    from versatune_ds.config import RunConfig, TrainConfig

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    """bf16 | fp16 | fp32 | auto (auto: bf16 with CUDA, fp32 without)."""
    return TORCH_DTYPES[resolve_dtype_name(name, cuda=torch.cuda.is_available())]


def resolve_attn_implementation(requested: str) -> str:
    """`auto`: flash_attention_2 when the package is importable and CUDA is there, else sdpa."""
    if requested != "auto":
        return requested
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if torch.cuda.is_available() and is_flash_attn_2_available() else "sdpa"


def load_model(cfg: RunConfig, ds_config: dict | None, *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The causal LM of `cfg.model`; partitioned at load when `ds_config` is ZeRO-3 (call on every rank).

    Call after the process group is up (ZeRO-3 partitioning is collective).
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    dtype = dtype if dtype is not None else torch_dtype(cfg.model.dtype)
    keeper = HfDeepSpeedConfig(ds_config) if ds_config is not None and zero_stage(ds_config) == 3 else None
    if keeper is None:
        # A ZeRO-3 model loaded earlier in this process (a probe, a reference) would otherwise make
        # transformers partition this one too: its HfDeepSpeedConfig is a process-wide weak reference.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": cfg.model.trust_remote_code,
        "attn_implementation": resolve_attn_implementation(cfg.model.attn_implementation),
    }
    if cfg.model.gguf_file:
        kwargs["gguf_file"] = cfg.model.gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.path: could not load a causal LM from {cfg.model.path!r}: {exc}") from None
    # transformers keeps only a weak reference to the HfDeepSpeedConfig; tie its life to the model's.
    model._versatune_hf_ds_config = keeper  # noqa: SLF001 (our own attribute)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def lr_factor(step: int, train: TrainConfig, total_steps: int) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup, then cosine/linear/constant to min_lr_ratio."""
    warmup = train.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if train.lr_scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = train.min_lr_ratio
    if train.lr_scheduler == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, train: TrainConfig, ds_config: dict) -> torch.optim.Optimizer:
    """AdamW over the model's parameters; no weight decay on biases and norm weights (1-D tensors).

    With optimizer offload on a GPU machine DeepSpeedCPUAdam does the update on the CPU (fast, vectorised);
    on a CPU-only machine the parameters already live on the CPU and torch's AdamW avoids its 30-60 s build.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 partitioned params keep their shape here
        (decay if len(shape) >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = {"lr": train.learning_rate, "betas": (train.adam_beta1, train.adam_beta2), "eps": train.adam_eps}
    if offloads_optimizer(ds_config) and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy (fp32) with the causal shift applied to the labels, not the logits.

    Shifting the labels (pad one -100 on the right, drop the first) keeps the logits contiguous, so no
    copy of the [batch, seq, vocab] tensor is made in forward or backward (as HF's ForCausalLMLoss does).
    """
    import torch.nn.functional as F

    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].to(logits.device)
    return F.cross_entropy(
        logits.float().view(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def count_loss_tokens(batch: dict) -> int:
    """Label tokens of a collated batch after the causal shift (what `row_loss_sums` counts)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class StepResult:
    loss: float  # token-mean cross-entropy over the global batch
    loss_tokens: int  # label tokens in the global batch (all ranks)
    grad_norm: float | None  # before clipping; None when DeepSpeed does not report it
    lr: float  # the learning rate this step used
    skipped: bool  # a non-finite loss or gradient: no rank updated anything


class TrainEngine:
    """`deepspeed.initialize` around an HF model, with a client AdamW and our LR schedule."""

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, ds_config: dict, *, total_steps: int) -> None:
        import deepspeed

        self.ds_config = ds_config
        self.stage = zero_stage(ds_config)
        optimizer = build_optimizer(model, cfg.train, ds_config)
        train = cfg.train
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, train, total_steps))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        # DeepSpeed averages gradients over the data-parallel group: the loss scale must use its size.
        self.world_size = int(self.engine.dp_world_size)
        self.skipped_steps = 0

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    def train_step(self, micro_batches: Sequence[dict]) -> StepResult:
        """Forward + backward over this rank's accumulation micro-batches, then one optimizer step.

        Every rank must call this with the same number of micro-batches (ZeRO-3 lockstep).
        """
        if not micro_batches:
            raise ValueError("train_step needs at least one micro-batch")
        lr = self.lr
        local_tokens = float(sum(count_loss_tokens(b) for b in micro_batches))
        global_tokens = float(dist.all_reduce_sum(np.array([local_tokens]))[0])
        scale = self.world_size / max(global_tokens, 1.0)
        self.engine.train()
        local_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        local_nonfinite = torch.zeros((), dtype=torch.float64, device=self.device)
        last = len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            self.engine.set_gradient_accumulation_boundary(i == last)
            inputs = self._to_device(batch)
            labels = inputs.pop("labels")
            logits = self.engine(**inputs, use_cache=False).logits
            loss_sum = token_loss_sum(logits, labels)
            # Decided on the device, without a host sync: a non-finite loss multiplies the backward by NaN,
            # so every gradient of every rank turns non-finite (see the module docstring).
            finite = torch.isfinite(loss_sum.detach())
            factor = torch.where(finite, torch.tensor(scale, device=finite.device), torch.tensor(float("nan"), device=finite.device))
            self.engine.backward(loss_sum * factor.detach(), scale_wrt_gas=False)
            local_sum += torch.where(finite, loss_sum.detach().double(), torch.zeros_like(local_sum))
            local_nonfinite += (~finite).double()
        flags = torch.stack([local_sum, local_nonfinite]).cpu().numpy()
        if self.stage == 0 and flags[1] == 0 and _grads_nonfinite(self.module):
            flags[1] = 1.0
        # One collective for both: the loss sum for the log, and whether any rank saw a non-finite value.
        totals = dist.all_reduce_sum(flags)
        skipped = bool(totals[1] > 0)
        if skipped and self.stage == 0:
            self.engine.zero_grad()
        else:
            self.engine.step()
            if skipped and self.engine.was_step_applied():
                raise RuntimeError("DeepSpeed applied an optimizer step with a non-finite loss; weights may be corrupt")
            # DeepSpeed may also refuse a step on its own (non-finite gradients with a finite loss).
            skipped = skipped or not self.engine.was_step_applied()
        if skipped:
            self.skipped_steps += 1
        grad_norm = None if skipped else _as_float(self.engine.get_global_grad_norm())
        loss = float("nan") if skipped else float(totals[0] / max(global_tokens, 1.0))
        return StepResult(loss=loss, loss_tokens=int(global_tokens), grad_norm=grad_norm, lr=lr, skipped=skipped)

    def forward_loss_sums(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (loss sum, label tokens) without gradients; for evaluation (every rank, same number of calls)."""
        inputs = self._to_device(batch)
        labels = inputs.pop("labels")
        with torch.no_grad():
            logits = self.engine(**inputs, use_cache=False).logits
            sums, counts = row_loss_sums(logits, labels)
        return sums.double().cpu(), counts.cpu()

    def forward_logits(self, batch: dict) -> torch.Tensor:
        """Logits of a batch (fp32, on the CPU), without gradients; used by export checks."""
        inputs = self._to_device(batch)
        inputs.pop("labels", None)
        with torch.no_grad():
            return self.engine(**inputs, use_cache=False).logits.float().cpu()

    @contextmanager
    def eval_mode(self) -> Iterator[None]:
        self.engine.eval()
        try:
            yield
        finally:
            self.engine.train()

    def save(self, directory: str, tag: str, client_state: dict) -> None:
        """DeepSpeed checkpoint of model, optimizer and LR schedule (call on every rank)."""
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)

    def load(self, directory: str, tag: str) -> dict:
        """Restore a checkpoint saved by `save`; returns the client state (call on every rank)."""
        path, client_state = self.engine.load_checkpoint(
            directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise UserError(f"could not load the DeepSpeed checkpoint {directory}/{tag}: files are missing or unreadable")
        return client_state or {}


def _grads_nonfinite(module: torch.nn.Module) -> bool:
    for param in module.parameters():
        if param.grad is not None and not torch.isfinite(param.grad).all():
            return True
    return False


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value.item() if hasattr(value, "item") else value)
    return value if math.isfinite(value) else None


def start_process_group(env: dist.DistEnv, *, backend: str, timeout_s: int) -> None:
    """The process group DeepSpeed needs, also for one process (a private in-memory store: no port to collide on)."""
    if env.is_distributed:
        dist.init_distributed(env, backend=backend, timeout_s=timeout_s)
        return
    import datetime
    import os

    import deepspeed
    import torch.distributed as torch_dist

    if torch_dist.is_initialized():
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = dist.resolve_backend(backend)
    if backend == "gloo":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 30-60 s JIT build
    torch_dist.init_process_group(
        backend=backend, store=torch_dist.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(seconds=timeout_s)
    )
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


class EvalEngine:
    """A model under DeepSpeed without an optimizer (ZeRO-3 partitioned when the config says so), for evaluation."""

    def __init__(self, cfg: RunConfig, ds_config: dict, model_path: str) -> None:
        import dataclasses

        import deepspeed

        model_cfg = dataclasses.replace(cfg.model, path=model_path, gguf_file=None, gradient_checkpointing=False)
        model = load_model(dataclasses.replace(cfg, model=model_cfg), ds_config)
        inference_config = {k: v for k, v in ds_config.items() if k not in ("zero_force_ds_cpu_optimizer",)}
        self.engine, _, _, _ = deepspeed.initialize(model=model, config=inference_config)
        self.engine.eval()

    def forward_loss_sums(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v.to(self.engine.device) for k, v in batch.items()}
        labels = inputs.pop("labels")
        with torch.no_grad():
            logits = self.engine(**inputs, use_cache=False).logits
            sums, counts = row_loss_sums(logits, labels)
        return sums.double().cpu(), counts.cpu()
