"""The training pipelines of bench/peer_throughput.py, one per `torchrun` launch (every rank runs this).

    python bench/peer_workers.py <pipeline> <spec.json>      (started by peer_throughput.py, never by hand)

Pipelines (all on the same model folder, rows, seq_len, micro-batch, DeepSpeed dict, fp32, AdamW, steps):

- `ours`:        `versatune_ds.train.run_training` -- the function `versatune-ds train` calls -- on the selected
                 rows (packed per domain by best-fit decreasing, `mixture.strategy=proportional`), with the real
                 DeepSpeed engine wrapped only to note the time at which each `train_step` begins.
- `hf_trainer`:  `transformers.Trainer` fed our packed rows (the same `prepare_data` rows, our collator).
- `trl_packing`: TRL `SFTTrainer`, `packing=True, packing_strategy="bfd"` (padding-free) on the selected rows,
                 pre-tokenized by our tokenizer and template (input_ids + assistant-only labels).
- `trl_nopack`:  TRL `SFTTrainer`, no packing (each example one row, padded to the longest in the micro-batch).

Every pipeline runs `steps + 1` optimizer steps' worth of loop and stops at the start of step `steps + 1`: it
notes the time at which every step began (`begins`, perf_counter seconds, len = steps + 1), the non-pad and
loss-bearing tokens of each step's batch on this rank (peers: counted where the collator built the batch; ours:
from metrics.jsonl, already summed over ranks), and this rank's peak RSS (getrusage maxrss). Each rank writes
`rank<r>.json` into `spec["out_dir"]`, waits until every rank has written (so no rank leaves while a peer is
still inside a collective) and ends the process with `os._exit(0)` (see versatune_ds/cli.py: tearing down a
multi-rank gloo group can abort a finished rank).

Loss-bearing tokens are counted the same way everywhere: label positions that are not -100 after the causal
shift, `(labels[:, 1:] != -100).sum()` of the collated batch (what `engine.losses.count_loss_tokens` counts).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

IGNORE_INDEX = -100
PIPELINES = ("ours", "trl_packing", "trl_nopack", "hf_trainer")


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def loss_tokens_of(labels: Any) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def finish(spec: dict, rank: int, world_size: int, record: dict) -> None:
    """Write this rank's record, wait for every rank's, then leave without tearing down the process group."""
    out = Path(spec["out_dir"])
    record = {**record, "rank": rank, "peak_rss_mib": round(peak_rss_mib(), 1)}
    tmp = out / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, out / f"rank{rank}.json")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not all((out / f"rank{r}.json").is_file() for r in range(world_size)):
        time.sleep(0.2)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------------------------------
# ours


class TimedEngine:
    """Our DeepSpeed engine, unchanged, with the time each `train_step` begins noted; stops at step `steps + 1`."""

    def __init__(self, inner: Any, steps: int, on_stop: Callable[[list[float]], None]) -> None:
        self.inner = inner
        self.steps = steps
        self.on_stop = on_stop
        self.begins: list[float] = []

    def __getattr__(self, name: str) -> Any:  # everything else is the real engine's
        return getattr(self.inner, name)

    def train_step(self, micro_batches: Sequence[Any]) -> Any:
        self.begins.append(time.perf_counter())
        if len(self.begins) == self.steps + 1:
            self.on_stop(self.begins)
        return self.inner.train_step(micro_batches)


def run_ours(cfg: Any, spec: dict) -> None:
    from versatune_ds import dist
    from versatune_ds.log import read_jsonl
    from versatune_ds.train import deepspeed_engine, run_training

    env = dist.DistEnv.from_environ()
    steps = int(spec["steps"])
    metrics_file = Path(cfg.train.run_dir) / "metrics.jsonl"

    def on_stop(begins: list[float]) -> None:
        record: dict[str, Any] = {"pipeline": "ours", "begins": begins, "counts_are_global": True}
        if env.is_main:  # metrics.jsonl (rank 0) holds every step so far, summed over ranks
            by_step = {int(r["step"]): r for r in read_jsonl(metrics_file) if "train/loss_tokens" in r}
            rows = [by_step[s] for s in range(1, steps + 1)]
            record["nonpad_tokens"] = [sum(v for k, v in r.items() if k.startswith("train/domain_tokens/")) for r in rows]
            record["loss_tokens"] = [int(r["train/loss_tokens"]) for r in rows]
            record["loss"] = [r["train/loss"] for r in rows]
        finish(spec, env.rank, env.world_size, record)

    def factory(run_cfg: Any, ds_config: dict) -> Any:
        return TimedEngine(deepspeed_engine(run_cfg, ds_config), steps, on_stop)

    run_training(cfg, resume="none", engine_factory=factory)
    raise RuntimeError("the run ended before step steps + 1; train.max_steps must be steps + 1")


# ----------------------------------------------------------------------------------------------
# The peers (transformers.Trainer, TRL SFTTrainer)


class CountingCollator:
    """A collator that notes each batch's non-pad and loss-bearing tokens, in the order batches are built."""

    def __init__(self, inner: Callable[[list], dict], nonpad_of: Callable[[list], int]) -> None:
        self.inner = inner
        self.nonpad_of = nonpad_of
        self.counts: list[tuple[int, int]] = []

    def __call__(self, features: list) -> dict:
        batch = self.inner(features)
        self.counts.append((int(self.nonpad_of(features)), loss_tokens_of(batch["labels"])))
        return batch


def _step_clock(steps: int, on_stop: Callable[[list[float]], None]) -> Any:
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Notes when every optimizer step begins (after its batches were fetched); stops at step steps + 1."""

        def __init__(self) -> None:
            self.begins: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - the TrainerCallback signature
            self.begins.append(time.perf_counter())
            if len(self.begins) == steps + 1:
                on_stop(self.begins)
            return control

    return StepClock()


def _training_arguments(cls: Any, cfg: Any, spec: dict, ds_config: dict, **extra: Any) -> Any:
    """The peers' TrainingArguments / SFTConfig: the same batch, steps, optimizer and DeepSpeed dict as ours."""
    import torch

    train = cfg.train
    return cls(
        output_dir=cfg.train.run_dir, use_cpu=not torch.cuda.is_available(), deepspeed=ds_config,
        per_device_train_batch_size=train.micro_batch_size, gradient_accumulation_steps=train.gradient_accumulation_steps,
        max_steps=int(spec["steps"]) + 1, learning_rate=train.learning_rate, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=train.weight_decay, adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2,
        adam_epsilon=train.adam_eps, max_grad_norm=train.max_grad_norm, optim="adamw_torch_fused",  # ours: torch AdamW, fused (the HF default too)
        bf16=spec["dtype"] == "bf16", fp16=False, gradient_checkpointing=cfg.model.gradient_checkpointing,
        logging_steps=10**6, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        seed=train.seed, **extra,
    )


def _load_peer_model(cfg: Any) -> Any:
    """The model folder as every peer loads it: after the TrainingArguments, so ZeRO-3 partitions it at load."""
    from transformers import AutoModelForCausalLM

    from versatune_ds.engine.models import resolve_attn_implementation, resolve_dtype_name, torch_dtype

    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.path, dtype=torch_dtype(resolve_dtype_name(cfg.model.dtype)),
        attn_implementation=resolve_attn_implementation(cfg.model.attn_implementation),
    )
    model.config.use_cache = False
    return model


def run_peer(pipeline: str, cfg: Any, spec: dict) -> None:
    from versatune_ds import dist
    from versatune_ds.data.tokenizer import load_tokenizer
    from versatune_ds.engine.ds_config import build_ds_config

    env = dist.DistEnv.from_environ()
    ds_config = build_ds_config(cfg, env.world_size)  # the very dict ours runs with
    # HF Trainer + DeepSpeed on CPU: the process group must be up before TrainingArguments (CPU_FACTS.md).
    dist.start_process_group(env, backend=cfg.dist.backend, timeout_s=cfg.dist.timeout_s)
    tokenizer = load_tokenizer(cfg.model)
    steps = int(spec["steps"])
    holder: dict[str, CountingCollator] = {}

    def on_stop(begins: list[float]) -> None:
        counts = holder["collator"].counts[: steps * cfg.train.gradient_accumulation_steps]
        finish(spec, env.rank, env.world_size, {
            "pipeline": pipeline, "begins": begins, "counts_are_global": False,
            "nonpad_tokens": [n for n, _ in counts], "loss_tokens": [n for _, n in counts],
        })

    clock = _step_clock(steps, on_stop)
    if pipeline == "hf_trainer":
        trainer = _hf_trainer(cfg, spec, ds_config, tokenizer, clock)
        holder["collator"] = trainer.data_collator
    else:
        trainer = _trl_trainer(cfg, spec, ds_config, tokenizer, clock, packing=pipeline == "trl_packing")
        holder["collator"] = trainer.data_collator = CountingCollator(
            trainer.data_collator, lambda features: sum(len(f["input_ids"]) for f in features)
        )
    trainer.train()
    raise RuntimeError(f"{pipeline} ended before step steps + 1")


def _hf_trainer(cfg: Any, spec: dict, ds_config: dict, tokenizer: Any, clock: Any) -> Any:
    """transformers.Trainer on our packed rows (the rows `ours` samples from), with our collator."""
    import torch
    from transformers import Trainer, TrainingArguments

    from versatune_ds.data.packing import collate_rows
    from versatune_ds.data.prepare import prepare_data

    data = prepare_data(cfg.data, tokenizer)
    rows = [row for domain in data.per_domain for row in domain.train_rows]

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, index: int) -> Any:
            return rows[index]

    collator = CountingCollator(
        lambda batch: collate_rows(batch, pad_token_id=data.pad_token_id, packed=True),
        lambda batch: sum(r.num_tokens for r in batch),
    )
    args = _training_arguments(TrainingArguments, cfg, spec, ds_config, remove_unused_columns=False)
    return Trainer(model=_load_peer_model(cfg), args=args, train_dataset=Rows(), data_collator=collator, callbacks=[clock])


def _trl_trainer(cfg: Any, spec: dict, ds_config: dict, tokenizer: Any, clock: Any, *, packing: bool) -> Any:
    """TRL SFTTrainer on the selected rows, pre-tokenized (input_ids + labels): TRL packs / pads them itself."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in Path(spec["tokenized"]).read_text(encoding="utf-8").splitlines() if line.strip()]
    dataset = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]})
    args = _training_arguments(
        SFTConfig, cfg, spec, ds_config, max_length=cfg.data.seq_len, packing=packing, packing_strategy="bfd",
        dataset_num_proc=None,
    )
    return SFTTrainer(model=_load_peer_model(cfg), args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])


def main(argv: Sequence[str]) -> int:
    pipeline, spec_path = argv
    if pipeline not in PIPELINES:
        raise SystemExit(f"unknown pipeline {pipeline!r}; one of {', '.join(PIPELINES)}")
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    from versatune_ds.config.loading import load_config

    cfg = load_config(spec["config"], [f"train.run_dir={spec['run_dir']}", f"train.max_steps={int(spec['steps']) + 1}"])
    if pipeline == "ours":
        run_ours(cfg, spec)
    else:
        run_peer(pipeline, cfg, spec)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
