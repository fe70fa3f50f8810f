"""`versatune-ds plan`: per-domain data sizes and the sample / token budget of a mixture, before training.

For each domain it prints what the data pipeline prepared (training and held-out examples, tokens,
loss tokens, rows, mean tokens per example, skipped rows) and what a run of `train.max_steps` optimizer
steps would draw from it with the given weights: the global batch is micro_batch_size ×
gradient_accumulation_steps × world size rows, so the budget is max_steps × that many rows.

Weights are shares in `mixture.unit` (tokens or examples), as in training: `--weights law=0.3,...`, else
the config's strategy through `mixture.initial_weights` (the versatune strategies read the probed
distribution from `mixture.distribution` or `<run_dir>/probe/distribution.json`). The sampler draws
rows, so the shares are turned into row probabilities q_d ∝ w_d / (units per row of domain d) exactly
as the training policy does (versatune_ds.weighting). The numbers are expectations for the initial
weights; the versatune strategy changes the weights during training.

A command module: torch / transformers / datasets are imported inside functions only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from versatune_ds.errors import UserError

if TYPE_CHECKING:
    from versatune_ds.config import RunConfig
    from versatune_ds.data import PreparedData
    from versatune_ds.domains import Domains

logger = logging.getLogger(__name__)

DISTRIBUTION_STRATEGIES = ("versatune", "versatune_static", "inverse")


@dataclass(frozen=True)
class DomainPlan:
    name: str
    train_examples: int
    heldout_examples: int
    train_tokens: int
    train_loss_tokens: int
    rows: int
    mean_tokens_per_example: float
    skipped_rows: int
    weight: float  # share in plan.unit (tokens or examples)
    row_probability: float  # what the sampler draws rows with
    samples: int  # rows drawn over the whole run
    tokens: float  # expected tokens drawn
    loss_tokens: float  # expected loss tokens drawn
    epochs: float  # samples / rows


@dataclass(frozen=True)
class Plan:
    weights_from: str
    unit: str
    seq_len: int
    packed: bool
    max_steps: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    rows_per_step: int
    total_samples: int
    domains: tuple[DomainPlan, ...]


def parse_weights(text: str, domains: Domains) -> np.ndarray:
    """`law=0.3,medicine=0.2,...` -> weights by domain id (every domain needed; normalised later)."""
    mapping: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not sep or not np.isfinite(number) or number < 0:
            raise UserError(f"--weights: {item!r} is not name=number (a number >= 0); write e.g. --weights law=0.3,code=0.7")
        mapping[name.strip()] = number
    weights = domains.array_from_mapping(mapping, key="--weights")
    if weights.sum() <= 0:
        raise UserError("--weights: the weights sum to 0; give at least one positive weight")
    return weights / weights.sum()


def config_weights(cfg: RunConfig, domains: Domains, data: PreparedData) -> tuple[np.ndarray, str]:
    """The initial share weights of the config's strategy (as training computes them) and where they came from."""
    from versatune_ds import mixture

    m = cfg.mixture
    distribution = None
    source = f"strategy {m.strategy}"
    if m.strategy in DISTRIBUTION_STRATEGIES:
        from versatune_ds.probe import read_distribution

        path = Path(m.distribution) if m.distribution else Path(cfg.train.run_dir) / "probe" / "distribution.json"
        if not path.is_file():
            where = f"mixture.distribution: file not found: {path}" if m.distribution else (
                f"mixture.distribution is not set and {path} does not exist"
            )
            raise UserError(
                f"mixture.strategy {m.strategy!r} starts from the probed distribution, and there is none ({where}); "
                "run `versatune-ds probe` first or pass --weights"
            )
        distribution = read_distribution(path, domains)
        source += f" (distribution {path})"
    sizes = [float(d.train_tokens if m.unit == "tokens" else d.train_examples) for d in data.per_domain]
    target_id = None if m.target_domain is None else domains.id_of(m.target_domain, key="mixture.target_domain")
    fixed = None if m.weights is None else domains.array_from_mapping(m.weights, key="mixture.weights")
    weights = mixture.initial_weights(
        m.strategy, distribution=distribution, domain_sizes=sizes, fixed=fixed, floor=m.floor,
        target_id=target_id, target_share=m.target_share, num_domains=len(domains),
    )
    return weights, source


def build_plan(cfg: RunConfig, data: PreparedData, weights: np.ndarray, weights_from: str, world_size: int) -> Plan:
    """The per-domain sizes and the budget of `train.max_steps` steps under `weights` (shares in mixture.unit)."""
    from versatune_ds import mixture

    unit = cfg.mixture.unit
    rows = np.array([len(d.train_rows) for d in data.per_domain], dtype=np.float64)
    if (rows == 0).any():
        empty = data.domains.name_of(int(np.flatnonzero(rows == 0)[0]))
        raise UserError(f"domain {empty!r} has no training rows; check its data.domains sources")
    tokens = np.array([d.train_tokens for d in data.per_domain], dtype=np.float64)
    loss_tokens = np.array([d.train_loss_tokens for d in data.per_domain], dtype=np.float64)
    examples = np.array([d.train_examples for d in data.per_domain], dtype=np.float64)
    units_per_row = (tokens if unit == "tokens" else examples) / rows
    row_probability = mixture.item_weights_from_token_weights(weights, units_per_row)
    rows_per_step = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world_size
    total = cfg.train.max_steps * rows_per_step
    samples = mixture.largest_remainder_counts(row_probability, total)
    share = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    per_domain = tuple(
        DomainPlan(
            name=data.domains.name_of(d.domain_id),
            train_examples=d.train_examples,
            heldout_examples=len(d.heldout),
            train_tokens=d.train_tokens,
            train_loss_tokens=d.train_loss_tokens,
            rows=len(d.train_rows),
            mean_tokens_per_example=d.train_tokens / d.train_examples,
            skipped_rows=sum(d.skipped.values()),
            weight=float(share[i]),
            row_probability=float(row_probability[i]),
            samples=int(samples[i]),
            tokens=float(samples[i] * tokens[i] / rows[i]),
            loss_tokens=float(samples[i] * loss_tokens[i] / rows[i]),
            epochs=float(samples[i] / rows[i]),
        )
        for i, d in enumerate(data.per_domain)
    )
    return Plan(
        weights_from=weights_from, unit=unit, seq_len=data.seq_len, packed=data.packed, max_steps=cfg.train.max_steps,
        micro_batch_size=cfg.train.micro_batch_size, gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        world_size=world_size, rows_per_step=rows_per_step, total_samples=total, domains=per_domain,
    )


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    return asdict(plan)


def plan_table(plan: Plan) -> Any:  # rich.table.Table
    from rich.table import Table

    title = (
        f"{plan.max_steps} steps × {plan.rows_per_step} rows/step (micro {plan.micro_batch_size} × accumulation "
        f"{plan.gradient_accumulation_steps} × world {plan.world_size}) = {plan.total_samples} rows of ≤{plan.seq_len} "
        f"tokens ({'packed' if plan.packed else 'one example per row'}); weights: {plan.weights_from}, shares of {plan.unit}"
    )
    table = Table(title=title, title_justify="left")
    headers = ("domain", "train ex.", "held-out", "tokens", "loss tok.", "rows", "tok/ex.", "skipped",
               f"weight ({plan.unit})", "rows drawn", "epochs", "tokens drawn", "token share")
    for header in headers:
        table.add_column(header, justify="left" if header == "domain" else "right")
    drawn = sum(d.tokens for d in plan.domains) or 1.0
    for d in plan.domains:
        table.add_row(
            d.name, f"{d.train_examples:,}", f"{d.heldout_examples:,}", f"{d.train_tokens:,}", f"{d.train_loss_tokens:,}",
            f"{d.rows:,}", f"{d.mean_tokens_per_example:.1f}", f"{d.skipped_rows:,}", f"{d.weight:.3f}", f"{d.samples:,}",
            f"{d.epochs:.2f}", f"{d.tokens:,.0f}", f"{d.tokens / drawn:.3f}",
        )
    total = [sum(getattr(d, k) for d in plan.domains) for k in ("train_examples", "heldout_examples", "train_tokens",
                                                                   "train_loss_tokens", "rows", "skipped_rows", "samples")]
    table.add_row("total", *(f"{v:,}" for v in total[:5]), "", f"{total[5]:,}", "1.000", f"{total[6]:,}", "",
                  f"{drawn:,.0f}", "1.000", style="bold")
    return table


# ----------------------------------------------------------------------------------------------
# The `plan` command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--weights", default=None,
                        help="domain weights as shares of mixture.unit, e.g. law=0.3,medicine=0.2,... (default: the config's strategy)")
    parser.add_argument("--world-size", type=int, default=None, help="number of ranks (default: $WORLD_SIZE or 1)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers to this JSON file")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. data.seq_len=2048")


def run_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from versatune_ds.config import load_config
    from versatune_ds.data import load_tokenizer, prepare_data

    world_size = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size < 1:
        raise UserError(f"--world-size: given {world_size}; expected a positive integer")
    cfg = load_config(args.config, args.overrides)
    data = prepare_data(cfg, load_tokenizer(cfg))
    if args.weights is not None:
        weights, source = parse_weights(args.weights, data.domains), "--weights"
    else:
        weights, source = config_weights(cfg, data.domains, data)
    plan = build_plan(cfg, data, weights, source, world_size)
    console = Console()
    if not console.is_terminal:  # piped or redirected: rich would squeeze the table into 80 columns
        console = Console(width=200)
    console.print(plan_table(plan))
    if args.json:
        _write_json(Path(args.json), plan_to_dict(plan))
        logger.info("wrote %s", args.json)
    return 0


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)
