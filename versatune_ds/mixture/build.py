"""Building the run's weight policy: initial share weights (also what `plan` shows), units per row, ℓ_ref.

`build_weight_policy` turns the mixture config, the probed distribution and the prepared data into a
`MixturePolicy` (mixture.policy). `initial_share_weights` is the one computation of a strategy's starting
weights from a run's data, shared by training and `versatune-ds plan`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from versatune_ds.config.schema import MixtureConfig
from versatune_ds.data.prepare import PreparedData
from versatune_ds.dist import DistEnv
from versatune_ds.domains import Domains
from versatune_ds.errors import UserError
from versatune_ds.eval.heldout import DomainLosses
from versatune_ds.mixture import composition, rules
from versatune_ds.mixture.policy import DYNAMIC_STRATEGIES, MIXTURE_FILE, MixturePolicy, format_weights
from versatune_ds.mixture.reference import resolve_reference_losses

logger = logging.getLogger(__name__)


def initial_share_weights(
    m: MixtureConfig, domains: Domains, data: PreparedData, distribution: np.ndarray | Sequence[float] | None
) -> np.ndarray:
    """w0 of `m.strategy` as shares of `m.unit`, from the data sizes and the probed distribution (if needed)."""
    n = len(domains)
    if distribution is not None:
        distribution = np.asarray(distribution, dtype=np.float64)
        if distribution.shape != (n,):
            raise UserError(f"the probed distribution has {distribution.size} values for {n} domains ({', '.join(domains.names)})")
    target_id = None if m.target_domain is None else domains.id_of(m.target_domain, key="mixture.target_domain")
    fixed = None if m.weights is None else domains.array_from_mapping(m.weights, key="mixture.weights")
    return composition.initial_weights(
        m.strategy, distribution=distribution, domain_sizes=domain_sizes(data, m.unit), fixed=fixed, floor=m.floor,
        target_id=target_id, target_share=m.target_share, num_domains=n,
    )



def build_weight_policy(
    m: MixtureConfig,
    domains: Domains,
    data: PreparedData,
    run_dir: str | os.PathLike[str] | None,
    env: DistEnv,
    *,
    initial_distribution: np.ndarray | Sequence[float] | None,
    reference_losses: np.ndarray | Sequence[float] | None = None,
    evaluate_model: Callable[[str], DomainLosses] | None = None,
    example_ids: Sequence[Sequence[int]] | None = None,
) -> MixturePolicy:
    """The policy for `cfg.mixture`. Call on every rank (reference-model evaluation is collective).

    initial_distribution: the probed p by domain id (needed by versatune*, inverse).
    reference_losses: ℓ_ref by domain id, when the caller has it already.
    evaluate_model(model_path) -> the per-domain held-out evaluation; used for mixture.reference_model.
    example_ids: per domain, the held-out examples evaluate_model scores (keys the reference cache).
    run_dir: where mixture.json / reference_losses.json go (None: write nothing, for tests).
    """
    units_per_item = units_per_item_from_data(data, m.unit, domains)
    target_id = None if m.target_domain is None else domains.id_of(m.target_domain, key="mixture.target_domain")
    w0 = initial_share_weights(m, domains, data, initial_distribution)
    rule = rules.UpdateRule(
        rule=m.rule, alpha=m.alpha, beta=m.beta, eta=m.eta, smoothing=m.smoothing, floor=m.floor, max_change=m.max_change,
        noise_k=m.noise_k,
    )
    dynamic = m.strategy in DYNAMIC_STRATEGIES
    reference, source, reference_items = None, "none", None
    if dynamic and m.rule == "versatune":
        reference, source, reference_items = resolve_reference_losses(
            m, domains, data, run_dir, env, given=reference_losses, evaluate_model=evaluate_model, example_ids=example_ids
        )
    if dynamic and m.rule == "official" and env.is_main:
        # Measured in bench/quality_tiny.py: 15 updates gave the highest-loss domain 99 % of the weight.
        logger.warning("mixture.rule=official has no floor, cap or smoothing: its updates compound (w ∝ w0·exp(Σ losses)) "
                       "and can give one domain all the data; it is there to compare with the released code "
                       "(mixture.rule=versatune is the guarded rule)")
    if target_id is not None and not dynamic and m.strategy not in ("target_only", "target_plus_uniform"):
        logger.warning("mixture.target_domain is set but strategy %r is static; the target ramp applies to 'versatune' only", m.strategy)
    policy = MixturePolicy(
        domains=domains, strategy=m.strategy, unit=m.unit, initial_weights=w0, units_per_item=units_per_item,
        rule=rule, warmup_steps=int(m.warmup_steps), reference_losses=reference, reference_source=source,
        reference_items=reference_items,
        fallback_factor=m.reference_fallback_factor, target_id=target_id if dynamic else None,
        target_share=m.target_share, target_ramp_steps=int(m.target_ramp_steps),
        mixture_path=None if run_dir is None else Path(run_dir) / MIXTURE_FILE, is_main=env.is_main,
    )
    if env.is_main:
        logger.info("mixture %s (%s shares): w0 %s", m.strategy, m.unit, format_weights(domains.mapping_from_array(w0)))
    # An existing mixture.json may belong to a run about to resume: leave it until load_state_dict trims it
    # or the first update of a fresh run rewrites it.
    if policy.mixture_path is not None and not policy.mixture_path.exists():
        policy.write_mixture_file()
    return policy


def units_per_item_from_data(data: PreparedData, unit: str, domains: Domains) -> np.ndarray:
    """Mean tokens (unit=tokens) or examples (unit=examples) per training row, by domain id."""
    values = []
    for domain_id, domain_data in enumerate(data.per_domain):
        rows = domain_data.train_rows
        if not rows:
            raise UserError(
                f"domain {domains.name_of(domain_id)!r} has no training rows after loading; check its data.domains "
                "train sources (or its skipped-row counts) or remove the domain"
            )
        if unit == "tokens":
            total = sum(int(row.input_ids.shape[0]) for row in rows)
        else:
            total = sum(len(row.example_indices) for row in rows)
        values.append(total / len(rows))
    return np.asarray(values, dtype=np.float64)


def sampler_rows(data: PreparedData, unit: str) -> tuple[str, list[np.ndarray] | None]:
    """The sampler's unit for mixture.unit, and each training row's size in it (mixture.sampler).

    tokens: every row's tokens. examples: every row's packed examples, or plain rows ("items", the same
    apportionment, faster) when each row holds one example (data.packing false).
    """
    if unit == "tokens":
        return "tokens", [np.asarray([r.num_tokens for r in d.train_rows], dtype=np.int64) for d in data.per_domain]
    sizes = [np.asarray([len(r.example_indices) for r in d.train_rows], dtype=np.int64) for d in data.per_domain]
    if all(np.all(s == 1) for s in sizes):
        return "items", None
    return "examples", sizes


def domain_sizes(data: PreparedData, unit: str) -> np.ndarray:
    attribute = "train_tokens" if unit == "tokens" else "train_examples"
    return np.asarray([float(getattr(d, attribute)) for d in data.per_domain], dtype=np.float64)
