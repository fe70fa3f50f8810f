"""Per-domain data sizes and the sample / token budget of a mixture, before training (`versatune-ds plan`).

For each domain it prints what the data pipeline prepared (training and held-out examples, tokens,
loss tokens, rows, mean tokens per example, skipped rows) and what a run of `train.max_steps` optimizer
steps would draw from it with the given weights: the global batch is micro_batch_size ×
gradient_accumulation_steps × world size rows, so the budget is max_steps × that many rows.

Weights are shares in `mixture.unit` (tokens or examples), as in training: `--weights law=0.3,...`, else
the config's strategy through `mixture.build.initial_share_weights` (the versatune strategies read the probed
distribution from `mixture.distribution` or `<run_dir>/probe/distribution.json`). The sampler apportions
those shares of tokens (examples) exactly, counting each row's size (mixture.sampler), so over a run it
draws domain d's rows at the rate q_d ∝ w_d / (units per row of domain d): the "rows drawn" column is
that rate times the run's rows, and the token columns follow from the rows' mean sizes. The numbers are
for the initial weights; the versatune strategy changes the weights during training.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from versatune_ds.config.schema import RunConfig
from versatune_ds.data.prepare import PreparedData
from versatune_ds.domains import Domains
from versatune_ds.errors import UserError
from versatune_ds.mixture import composition
from versatune_ds.mixture.build import initial_share_weights, units_per_item_from_data
from versatune_ds.probe.distribution import DISTRIBUTION_FILE, PROBE_DIR, read_distribution

logger = logging.getLogger(__name__)

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
    row_probability: float  # the long-run share of rows the sampler draws from this domain
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
    m = cfg.mixture
    distribution = None
    source = f"strategy {m.strategy}"
    if m.strategy in composition.DISTRIBUTION_STRATEGIES:
        path = Path(m.distribution) if m.distribution else Path(cfg.train.run_dir) / PROBE_DIR / DISTRIBUTION_FILE
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
    return initial_share_weights(m, domains, data, distribution), source


def build_plan(cfg: RunConfig, data: PreparedData, weights: np.ndarray, weights_from: str, world_size: int) -> Plan:
    """The per-domain sizes and the budget of `train.max_steps` steps under `weights` (shares in mixture.unit)."""
    unit = cfg.mixture.unit
    rows = np.array([len(d.train_rows) for d in data.per_domain], dtype=np.float64)
    if (rows == 0).any():
        empty = data.domains.name_of(int(np.flatnonzero(rows == 0)[0]))
        raise UserError(f"domain {empty!r} has no training rows; check its data.domains sources")
    tokens = np.array([d.train_tokens for d in data.per_domain], dtype=np.float64)
    loss_tokens = np.array([d.train_loss_tokens for d in data.per_domain], dtype=np.float64)
    row_probability = composition.item_weights_from_token_weights(weights, units_per_item_from_data(data, unit, data.domains))
    rows_per_step = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world_size
    total = cfg.train.max_steps * rows_per_step
    samples = composition.largest_remainder_counts(row_probability, total)
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


def plan_table(plan: Plan) -> Table:
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
