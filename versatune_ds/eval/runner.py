"""The work of `versatune-ds eval`: per-domain held-out loss and multiple-choice accuracy of a model.

Single process, or one process per rank under torchrun / the deepspeed launcher / srun. By default every
rank holds a full replica of the model and scores its share of the items; `zero3` partitions the
weights with ZeRO-3 (every forward is then a collective, which the lockstep batching of
eval.heldout / eval.mcq keeps in step). Results are identical on every rank; rank 0 prints and writes them.

Model sources: `model` (a folder); `run_dir` = run_dir/final (the exported model); `run_dir` + `checkpoint`
= the DeepSpeed checkpoint run_dir/checkpoints/TAG on top of the run's base model (config.yaml's model.path).
Held-out sets: `heldout` name=file pairs (tokenized with the run's template), or, when none is given, the
held-out split of every domain of `config` (or of run_dir/config.yaml).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from versatune_ds import dist
from versatune_ds.config.loading import load_config
from versatune_ds.config.schema import DataConfig, ModelConfig, RunConfig
from versatune_ds.data.packing import Example
from versatune_ds.data.prepare import prepare_data, tokenize_sft_file
from versatune_ds.data.tokenizer import load_tokenizer
from versatune_ds.domains import Domains
from versatune_ds.engine.models import CheckpointRef, load_inference_model, torch_dtype
from versatune_ds.errors import UserError
from versatune_ds.eval import mcq
from versatune_ds.eval.heldout import DomainLosses, evaluate_domain_losses, hf_forward
from versatune_ds.files import write_json_atomic

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalRequest:
    """What to evaluate and how (the `eval` command's flags)."""

    model: str | None = None
    run_dir: str | None = None
    checkpoint: str | None = None
    config: str | None = None
    overrides: tuple[str, ...] = ()
    heldout: tuple[str, ...] = ()  # DOMAIN=PATH
    mcq: tuple[str, ...] = ()  # DOMAIN=PATH
    batch_size: int | None = None
    max_items: int | None = None
    seed: int = 0
    max_length: int = 2048
    chat_template: bool = False
    zero3: bool = False
    dtype: str = "auto"
    out: str | None = None


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


def resolve_config_and_model(request: EvalRequest) -> tuple[RunConfig, ModelConfig, CheckpointRef | None]:
    """The run config (held-out sets, data settings), the model to load, and a checkpoint to put on top."""
    given = [flag for flag, value in (("--model", request.model), ("--run-dir", request.run_dir)) if value]
    if len(given) > 1:
        raise UserError("eval: give either --model or --run-dir, not both")
    if request.checkpoint and not request.run_dir:
        raise UserError("eval: --checkpoint needs --run-dir (the checkpoint tag is looked up in RUN_DIR/checkpoints/)")
    config_path = request.config
    if config_path is None and request.run_dir and (Path(request.run_dir) / "config.yaml").is_file():
        config_path = str(Path(request.run_dir) / "config.yaml")
    if config_path is not None:
        # --model replaces the config's model before validation (the config may leave model.path empty).
        overrides = list(request.overrides) + ([f"model.path={request.model}"] if request.model else [])
        cfg = load_config(config_path, overrides)
    elif request.overrides:
        raise UserError(f"eval: overrides {list(request.overrides)} need --config")
    else:
        # No run config: defaults, with truncation so over-long held-out rows do not stop the evaluation.
        cfg = RunConfig(data=DataConfig(truncation="truncate"))
    if request.model:
        return cfg, cfg.model.for_folder(request.model), None
    if request.run_dir:
        run_dir = Path(request.run_dir)
        if request.checkpoint:
            root = run_dir / "checkpoints"
            if not (root / request.checkpoint).is_dir():
                found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
                raise UserError(f"--checkpoint {request.checkpoint}: no such checkpoint in {root}; found: {found or 'none'}")
            if not cfg.model.path:
                raise UserError(f"--checkpoint needs the run's base model: {run_dir}/config.yaml (model.path) is missing")
            return cfg, cfg.model, CheckpointRef(str(root), request.checkpoint)
        final = run_dir / "final"
        if not (final / "config.json").is_file():
            raise UserError(f"--run-dir {run_dir}: no exported model in {final}; export it, or pass --checkpoint TAG")
        return cfg, cfg.model.for_folder(str(final)), None
    if cfg.model.path:
        return cfg, cfg.model, None
    raise UserError("eval: no model given; pass --model DIR, --run-dir R or --config C (with model.path)")


def run_eval(request: EvalRequest) -> dict[str, Any]:
    """Evaluate on every rank; returns the results (identical on every rank), printed and written by rank 0."""
    if request.batch_size is not None and request.batch_size <= 0:
        raise UserError(f"--batch-size: given {request.batch_size}; expected a positive integer")
    if request.max_items is not None and request.max_items <= 0:
        raise UserError(f"--max-items: given {request.max_items}; expected a positive integer")
    heldout_files = parse_domain_paths(request.heldout, "--heldout")
    mcq_files = parse_domain_paths(request.mcq, "--mcq")
    cfg, model_cfg, checkpoint = resolve_config_and_model(request)
    use_config_heldout = not heldout_files and bool(cfg.data.domains) and (request.config or request.run_dir) is not None
    if not heldout_files and not mcq_files and not use_config_heldout:
        raise UserError("eval: nothing to evaluate; pass --heldout DOMAIN=PATH, --mcq DOMAIN=PATH or a --config with domains")
    names: list[str] = list(cfg.domain_names) if use_config_heldout else []
    for name, _ in heldout_files + mcq_files:
        if name not in names:
            names.append(name)
    domains = Domains.from_names(names)
    batch_size = request.batch_size or cfg.eval.micro_batch_size

    env = dist.DistEnv.from_environ()
    dist.start_process_group(env, backend=cfg.dist.backend, timeout_s=cfg.dist.timeout_s)
    tokenizer = load_tokenizer(model_cfg)
    heldout: list[list[Example]] = [[] for _ in names]
    if use_config_heldout:
        for domain_data in prepare_data(cfg.data, tokenizer).per_domain:
            heldout[domain_data.domain_id] = list(domain_data.heldout)
    for name, path in heldout_files:
        domain_id = domains.id_of(name, key="--heldout")
        heldout[domain_id].extend(tokenize_sft_file(path, tokenizer, cfg.data, domains, domain_id))
    heldout = [_subset(examples, request.max_items, request.seed) for examples in heldout]
    items = []
    for name, path in mcq_files:
        items.extend(mcq.load_mcq_file(path, domains.id_of(name, key="--mcq"), max_items=request.max_items, seed=request.seed))

    model = load_inference_model(model_cfg, env, zero3=request.zero3, dtype=torch_dtype(request.dtype), checkpoint=checkpoint)
    forward = hf_forward(model.module, model.device)
    losses = None
    if any(heldout):
        losses = evaluate_domain_losses(forward, heldout, micro_batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, env=env)
    accuracy = None
    if items:
        fmt = mcq.PromptFormat.chat() if request.chat_template else mcq.PromptFormat()
        scores = mcq.score_mcq(
            model.module, items, tokenizer, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, env=env,
            fmt=fmt, max_length=request.max_length, device=model.device,
        )
        accuracy = mcq.mcq_accuracy(scores, len(domains))
    del model
    results = results_dict(domains, losses, accuracy)
    if items:
        results["mcq_items"] = mcq_item_records(domains, scores)
    results["model"] = model_cfg.path if checkpoint is None else f"{checkpoint.root}/{checkpoint.tag}"
    results["world_size"] = env.world_size
    results["zero3"] = bool(request.zero3)
    if env.is_main:
        print_table(results)
        if request.out:
            write_json_atomic(request.out, results)
            logger.info("wrote %s", request.out)
    dist.barrier()
    dist.destroy()
    return results


def _subset(examples: list[Example], max_items: int | None, seed: int) -> list[Example]:
    if max_items is None or len(examples) <= max_items:
        return examples
    keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:max_items])
    return [examples[k] for k in keep]


def _number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def results_dict(domains: Domains, losses: DomainLosses | None, accuracy: mcq.McqAccuracy | None) -> dict[str, Any]:
    """{"domains": {name: {loss, loss_se, tokens, acc, acc_se, acc_norm, n}}, "macro": {loss, acc, acc_norm}}; null where
    not measured.

    loss_se: the standard error of the loss over the domain's held-out examples (eval.heldout); acc_se: that of
    the accuracy over the domain's items, sqrt(acc·(1−acc)/(n−1)) (null for fewer than 2 items).
    """
    per_domain = {}
    errors = losses.se if losses is not None else None
    for d, name in enumerate(domains.names):
        per_domain[name] = {
            "loss": _number(losses.loss[d]) if losses is not None else None,
            "loss_se": _number(errors[d]) if errors is not None else None,
            "tokens": int(losses.tokens[d]) if losses is not None else 0,
            "acc": _number(accuracy.acc[d]) if accuracy is not None else None,
            "acc_se": _accuracy_se(float(accuracy.acc[d]), int(accuracy.n[d])) if accuracy is not None else None,
            "acc_norm": _number(accuracy.acc_norm[d]) if accuracy is not None else None,
            "n": int(accuracy.n[d]) if accuracy is not None else 0,
        }
    macro = {}
    for key in ("loss", "acc", "acc_norm"):
        values = [v[key] for v in per_domain.values() if v[key] is not None]
        macro[key] = float(np.mean(values)) if values else None
    return {"domains": per_domain, "macro": macro}


def _accuracy_se(acc: float, n: int) -> float | None:
    return math.sqrt(acc * (1.0 - acc) / (n - 1)) if n >= 2 and math.isfinite(acc) else None


def mcq_item_records(domains: Domains, scores: Sequence[mcq.ItemScore]) -> dict[str, list[dict[str, Any]]]:
    """Per domain, one record per item (in item order): what two models scored on the same items need to be
    compared item by item (paired), as lm-eval's --log_samples gives. `index` is the item's position in the
    domain's scored list (the --max-items subset with its --seed, in file order)."""
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in domains.names}
    for score in scores:
        records[domains.names[score.domain_id]].append({
            "index": score.index, "answer": score.answer, "pred": score.pred, "pred_norm": score.pred_norm,
            "logprobs": [round(value, 6) for value in score.logprobs],
        })
    return {name: rows for name, rows in records.items() if rows}


def print_table(results: dict[str, Any]) -> None:
    table = Table(title=f"eval: {results['model']}")
    for column in ("domain", "loss ± se", "tokens", "acc ± se", "acc_norm", "n"):
        table.add_column(column, justify="left" if column == "domain" else "right")

    def fmt(value: Any, digits: int = 4) -> str:
        return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

    for name, row in results["domains"].items():
        loss = fmt(row["loss"]) if row["loss_se"] is None else f"{row['loss']:.4f} ± {row['loss_se']:.4f}"
        acc = fmt(row["acc"]) if row["acc_se"] is None else f"{row['acc']:.4f} ± {row['acc_se']:.4f}"
        table.add_row(name, loss, fmt(row["tokens"]), acc, fmt(row["acc_norm"]), fmt(row["n"]))
    macro = results["macro"]
    table.add_row("macro mean", fmt(macro["loss"]), "", fmt(macro["acc"]), fmt(macro["acc_norm"]), "", style="bold")
    Console(file=sys.stdout).print(table)
