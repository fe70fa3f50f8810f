"""The work of `versatune-ds eval` (arguments are declared in evaluate.py, the command module).

Single process, or one process per rank under torchrun / the deepspeed launcher / srun. By default every
rank holds a full replica of the model and scores its share of the items; `--zero3` partitions the
weights with ZeRO-3 (every forward is then a collective, which the lockstep batching of
evaluate.py / mcq.py keeps in step). Results are identical on every rank; rank 0 prints and writes them.

Model sources: `--model DIR`; `--run-dir R` = R/final (the exported model); `--run-dir R --checkpoint TAG`
= the DeepSpeed checkpoint R/checkpoints/TAG on top of the run's base model (config.yaml's model.path).
Held-out sets: `--heldout name=file` (tokenized with the run's template via data.tokenize_sft_file), or,
when none is given, the held-out split of every domain of `--config` (or of R/config.yaml).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from versatune_ds import dist
from versatune_ds.config import DataConfig, ModelConfig, RunConfig, load_config
from versatune_ds.domains import Domains
from versatune_ds.errors import UserError
from versatune_ds.evaluate import DomainLosses, evaluate_domain_losses, hf_forward

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    path: str  # HF folder (or the base model's folder when `checkpoint_dir` is set)
    gguf_file: str | None
    checkpoint_dir: str | None  # DeepSpeed checkpoint root (holding TAG/)
    checkpoint_tag: str | None


def parse_domain_paths(values: Sequence[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise UserError(f"{flag}: expected DOMAIN=PATH, got {value!r} (e.g. {flag} law=data/eval/law.jsonl)")
        if not Path(path).exists():
            raise UserError(f"{flag} {value}: file not found: {path}")
        out.append((name, path))
    return out


def resolve_config_and_model(args: argparse.Namespace) -> tuple[RunConfig, ModelSource]:
    given = [flag for flag, value in (("--model", args.model), ("--run-dir", args.run_dir)) if value]
    if len(given) > 1:
        raise UserError("eval: give either --model or --run-dir, not both")
    if args.checkpoint and not args.run_dir:
        raise UserError("eval: --checkpoint needs --run-dir (the checkpoint tag is looked up in RUN_DIR/checkpoints/)")
    config_path = args.config
    if config_path is None and args.run_dir and (Path(args.run_dir) / "config.yaml").is_file():
        config_path = str(Path(args.run_dir) / "config.yaml")
    if config_path is not None:
        # --model replaces the config's model before validation (the config may leave model.path empty).
        overrides = list(args.overrides) + ([f"model.path={args.model}"] if args.model else [])
        cfg = load_config(config_path, overrides)
    elif args.overrides:
        raise UserError(f"eval: overrides {args.overrides} need --config")
    else:
        # No run config: defaults, with truncation so over-long held-out rows do not stop the evaluation.
        cfg = RunConfig(data=DataConfig(truncation="truncate"))
    if args.model:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=args.model, tokenizer=None, gguf_file=None))
        return cfg, ModelSource(args.model, None, None, None)
    if args.run_dir:
        run_dir = Path(args.run_dir)
        if args.checkpoint:
            root = run_dir / "checkpoints"
            if not (root / args.checkpoint).is_dir():
                found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
                raise UserError(f"--checkpoint {args.checkpoint}: no such checkpoint in {root}; found: {found or 'none'}")
            if not cfg.model.path:
                raise UserError(f"--checkpoint needs the run's base model: {run_dir}/config.yaml (model.path) is missing")
            return cfg, ModelSource(cfg.model.path, cfg.model.gguf_file, str(root), args.checkpoint)
        final = run_dir / "final"
        if not (final / "config.json").is_file():
            raise UserError(f"--run-dir {run_dir}: no exported model in {final}; export it, or pass --checkpoint TAG")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(final), tokenizer=None, gguf_file=None))
        return cfg, ModelSource(str(final), None, None, None)
    if cfg.model.path:
        return cfg, ModelSource(cfg.model.path, cfg.model.gguf_file, None, None)
    raise UserError("eval: no model given; pass --model DIR, --run-dir R or --config C (with model.path)")


def torch_dtype(name: str, cuda: bool) -> Any:
    import torch

    if name == "auto":
        name = "bf16" if cuda else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def eval_ds_config(dtype: Any) -> dict:
    """A minimal inference-only ZeRO-3 config (no optimizer): partition every parameter."""
    import torch

    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 1_000_000,
    }
    if dtype == torch.bfloat16:
        ds["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        ds["fp16"] = {"enabled": True}
    return ds


def load_forward(cfg: RunConfig, source: ModelSource, env: dist.DistEnv, dtype_name: str, zero3: bool) -> tuple[Any, Any]:
    """(forward_fn, keep-alive object) for a replica or a ZeRO-3 partitioned model."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    dtype = torch_dtype(dtype_name, cuda)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.model.trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if not zero3:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
        if source.checkpoint_dir:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            from versatune_ds.checkpoint import weights_only_loading

            with weights_only_loading():  # zero_to_fp32 itself would unpickle with weights_only=False
                state = get_fp32_state_dict_from_zero_checkpoint(source.checkpoint_dir, tag=source.checkpoint_tag)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if "lm_head" not in k]:
                raise UserError(f"checkpoint {source.checkpoint_tag}: does not match {source.path} (missing {missing[:3]}, unexpected {unexpected[:3]})")
        device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
        model = model.to(device).eval()
        return hf_forward(model, device), model
    import deepspeed

    ds = eval_ds_config(dtype)
    try:
        from versatune_ds.engine import load_model  # helper E's loader, when it exists
    except ImportError:
        load_model = None
    if load_model is not None:
        model = load_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=source.path)), ds, dtype=dtype)
        keep: Any = None
    else:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds)  # must stay referenced while the model loads so weights partition at load
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    if source.checkpoint_dir:
        from versatune_ds.checkpoint import weights_only_loading

        with weights_only_loading():  # DeepSpeed itself would unpickle with weights_only=False
            engine.load_checkpoint(
                source.checkpoint_dir, tag=source.checkpoint_tag, load_module_only=True,
                load_optimizer_states=False, load_lr_scheduler_states=False,
            )
    engine.module.eval()
    return hf_forward(engine.module, engine.device), (engine, keep)


def run(args: argparse.Namespace) -> int:
    from versatune_ds import data, mcq

    if args.batch_size is not None and args.batch_size <= 0:
        raise UserError(f"--batch-size: given {args.batch_size}; expected a positive integer")
    if args.max_items is not None and args.max_items <= 0:
        raise UserError(f"--max-items: given {args.max_items}; expected a positive integer")
    heldout_files = parse_domain_paths(args.heldout, "--heldout")
    mcq_files = parse_domain_paths(args.mcq, "--mcq")
    cfg, source = resolve_config_and_model(args)
    use_config_heldout = not heldout_files and bool(cfg.data.domains) and (args.config or args.run_dir) is not None
    if not heldout_files and not mcq_files and not use_config_heldout:
        raise UserError("eval: nothing to evaluate; pass --heldout DOMAIN=PATH, --mcq DOMAIN=PATH or a --config with domains")
    names: list[str] = list(cfg.domain_names) if use_config_heldout else []
    for name, _ in heldout_files + mcq_files:
        if name not in names:
            names.append(name)
    domains = Domains.from_names(names)
    batch_size = args.batch_size or cfg.eval.micro_batch_size

    env = dist.DistEnv.from_environ()
    dist.init_distributed(env, backend=cfg.dist.backend, timeout_s=cfg.dist.timeout_s)
    tokenizer_cfg = cfg if source.checkpoint_dir else dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, path=source.path, gguf_file=source.gguf_file)
    )
    tokenizer = data.load_tokenizer(tokenizer_cfg)
    rng_seed = args.seed

    heldout: list[list] = [[] for _ in names]
    if use_config_heldout:
        prepared = data.prepare_data(cfg, tokenizer)
        for domain_data in prepared.per_domain:
            heldout[domain_data.domain_id] = list(domain_data.heldout)
    for name, path in heldout_files:
        domain_id = domains.id_of(name, key="--heldout")
        heldout[domain_id].extend(data.tokenize_sft_file(path, tokenizer, cfg, domain_id))
    heldout = [_subset(examples, args.max_items, rng_seed) for examples in heldout]
    items = []
    for name, path in mcq_files:
        items.extend(mcq.load_mcq_file(path, domains.id_of(name, key="--mcq"), max_items=args.max_items, seed=rng_seed))

    forward, keep_alive = load_forward(cfg, source, env, args.dtype, args.zero3)
    losses = None
    if any(heldout):
        losses = evaluate_domain_losses(forward, heldout, micro_batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, env=env)
    accuracy = None
    if items:
        fmt = mcq.PromptFormat.chat() if args.chat_template else mcq.PromptFormat()
        scores = mcq.score_mcq(
            forward, items, tokenizer, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, env=env,
            fmt=fmt, max_length=args.max_length,
        )
        accuracy = mcq.mcq_accuracy(scores, len(domains))
    del keep_alive
    results = results_dict(domains, losses, accuracy)
    results["model"] = source.path if not source.checkpoint_tag else f"{source.checkpoint_dir}/{source.checkpoint_tag}"
    results["world_size"] = env.world_size
    results["zero3"] = bool(args.zero3)
    if env.is_main:
        print_table(results)
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(out.suffix + ".tmp")
            tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, out)
            logger.info("wrote %s", out)
    dist.barrier()
    dist.destroy()
    return 0


def _subset(examples: list, max_items: int | None, seed: int) -> list:
    if max_items is None or len(examples) <= max_items:
        return examples
    keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:max_items])
    return [examples[k] for k in keep]


def _number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def results_dict(domains: Domains, losses: DomainLosses | None, accuracy: Any) -> dict:
    """{"domains": {name: {loss, tokens, acc, acc_norm, n}}, "macro": {loss, acc, acc_norm}}; null where not measured."""
    per_domain = {}
    for d, name in enumerate(domains.names):
        per_domain[name] = {
            "loss": _number(losses.loss[d]) if losses is not None else None,
            "tokens": int(losses.tokens[d]) if losses is not None else 0,
            "acc": _number(accuracy.acc[d]) if accuracy is not None else None,
            "acc_norm": _number(accuracy.acc_norm[d]) if accuracy is not None else None,
            "n": int(accuracy.n[d]) if accuracy is not None else 0,
        }
    macro = {}
    for key in ("loss", "acc", "acc_norm"):
        values = [v[key] for v in per_domain.values() if v[key] is not None]
        macro[key] = float(np.mean(values)) if values else None
    return {"domains": per_domain, "macro": macro}


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"eval: {results['model']}")
    for column in ("domain", "loss", "tokens", "acc", "acc_norm", "n"):
        table.add_column(column, justify="left" if column == "domain" else "right")

    def fmt(value: Any, digits: int = 4) -> str:
        return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

    for name, row in results["domains"].items():
        table.add_row(name, fmt(row["loss"]), fmt(row["tokens"]), fmt(row["acc"]), fmt(row["acc_norm"]), fmt(row["n"]))
    macro = results["macro"]
    table.add_row("macro mean", fmt(macro["loss"]), "", fmt(macro["acc"]), fmt(macro["acc_norm"]), "", style="bold")
    Console(file=sys.stdout).print(table)
