"""The train-time mixture policy: initial composition, dynamic γ/φ re-weighting, domain expansion.

`build_weight_policy(...)` turns the config, the probed distribution and the prepared data into a
`MixturePolicy`. The training loop calls, on every rank:

    policy.initial_item_weights()          -> sampler weights at step 0
    policy.after_eval(step, losses)        -> new sampler weights, or None (no change), after each evaluation

Weights have two faces:
- *share weights* w: what the user reasons about and what logs / mixture.json record: each domain's
  share of training tokens (mixture.unit=tokens) or of training examples (mixture.unit=examples).
- *item weights* q: what the sampler draws with. Sampler items are training rows; a packed row holds
  several examples, so q_d ∝ w_d / (mean units per row of domain d) (`mixture.item_weights_from_token_weights`,
  which is exact for any per-row unit) makes the expected share of units equal to w.

Decisions are made once: rank 0 computes the update and `dist.broadcast_array` sends it to every rank,
so all ranks hold bit-identical weights (DESIGN.md §4). The payload carries a leading flag so "no
change" (None) is also decided by rank 0 alone.

Reference losses ℓ_ref (for γ) come from versatune_ds.reference_losses: given, mixture.reference_losses,
mixture.reference_model (evaluated once, cached), or -- with a warning -- the first evaluated loss times
mixture.reference_fallback_factor.

Loss guards: a missing / zero / non-finite reference loss is refused when it is set, naming the
domain. A non-finite or non-positive held-out loss during training does not stop the run: that
update is skipped (weights kept, a warning names the domain, mixture.json records the skip); the
first loss used for the fallback reference must be valid, though, or there is no reference at all.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np

from versatune_ds import dist, mixture
from versatune_ds.domains import Domains
from versatune_ds.errors import UserError
from versatune_ds.reference_losses import first_bad_domain, resolve_reference_losses

if TYPE_CHECKING:
    from versatune_ds.config import RunConfig
    from versatune_ds.dist import DistEnv

logger = logging.getLogger(__name__)

MIXTURE_FILE = "mixture.json"
STATE_VERSION = 1
DYNAMIC_STRATEGIES = ("versatune",)


class WeightPolicy(Protocol):
    def initial_item_weights(self) -> np.ndarray: ...

    def after_eval(self, step: int, losses: np.ndarray) -> np.ndarray | None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class MixturePolicy:
    """Every strategy in one class: static strategies simply never change their weights.

    All ranks hold the same state; only rank 0 writes mixture.json.
    """

    def __init__(
        self,
        *,
        domains: Domains,
        strategy: str,
        unit: str,
        initial_weights: np.ndarray,
        units_per_item: np.ndarray,
        rule: mixture.UpdateRule,
        warmup_steps: int,
        reference_losses: np.ndarray | None,
        reference_source: str,
        fallback_factor: float,
        target_id: int | None,
        target_share: float,
        target_ramp_steps: int,
        mixture_path: Path | None,
        is_main: bool,
    ) -> None:
        self.domains = domains
        self.strategy = strategy
        self.unit = unit
        self.w0 = np.asarray(initial_weights, dtype=np.float64).copy()
        self.units_per_item = np.asarray(units_per_item, dtype=np.float64).copy()
        self.rule = rule
        self.warmup_steps = warmup_steps
        self.reference = None if reference_losses is None else np.asarray(reference_losses, dtype=np.float64).copy()
        self.reference_source = reference_source
        self.fallback_factor = fallback_factor
        self.target_id = target_id
        self.target_share = target_share
        self.target_ramp_steps = target_ramp_steps
        self.mixture_path = mixture_path
        self.is_main = is_main
        self.dynamic = strategy in DYNAMIC_STRATEGIES
        self.weights = self.w0.copy()
        self.prev_losses: np.ndarray | None = None
        self.records: list[dict] = []
        self.num_records = 0

    # -- sampler side ----------------------------------------------------------------------

    def item_weights(self, share_weights: np.ndarray | None = None) -> np.ndarray:
        """Sampler item weights for share weights (default: the current ones)."""
        weights = self.weights if share_weights is None else share_weights
        return mixture.item_weights_from_token_weights(weights, self.units_per_item)

    def initial_item_weights(self) -> np.ndarray:
        return self.item_weights(self.w0)

    def weights_by_name(self) -> dict[str, float]:
        return self.domains.mapping_from_array(self.weights)

    def metrics(self) -> dict[str, float]:
        """`mixture/<domain>/weight` (share weights) for the metrics log."""
        return {f"mixture/{name}/weight": value for name, value in self.weights_by_name().items()}

    # -- the update ------------------------------------------------------------------------

    def after_eval(self, step: int, losses: np.ndarray) -> np.ndarray | None:
        """Called on every rank with identical losses; returns identical item weights or None everywhere."""
        losses = np.asarray(losses, dtype=np.float64)
        if losses.shape != (len(self.domains),):
            raise ValueError(f"after_eval: expected {len(self.domains)} losses, got shape {losses.shape}")
        if self.reference is None and self.dynamic and self.rule.rule == "versatune":
            self._set_fallback_reference(losses)  # deterministic from identical losses: same on every rank
        if not self.dynamic or step < self.warmup_steps:
            self._remember(losses)
            return None
        size = len(self.domains) + 1
        payload = None
        if self.is_main:
            new_weights, record = self._compute(step, losses)
            flag = 0.0 if new_weights is None else 1.0
            payload = np.concatenate([[flag], self.weights if new_weights is None else new_weights])
            self._append_record(record)
        received = dist.broadcast_array(payload, size)
        self.num_records += 1
        self._remember(losses)
        if received[0] == 0.0:
            return None
        self.weights = received[1:].copy()
        if self.is_main:
            logger.info("step %d: new mixture weights %s", step, _fmt(self.weights_by_name()))
        return self.item_weights()

    def _remember(self, losses: np.ndarray) -> None:
        # φ compares with the previous *valid* evaluation; a broken one is not a baseline.
        if first_bad_domain(losses) is None:
            self.prev_losses = losses.copy()

    def _set_fallback_reference(self, losses: np.ndarray) -> None:
        bad = first_bad_domain(losses)
        if bad is not None:
            raise UserError(
                f"the first held-out loss of domain {self.domains.name_of(bad)!r} is {float(losses[bad])!r}; with no "
                "reference losses it would be the fallback reference and must be finite and > 0 -- check that "
                "domain's held-out set, or set mixture.reference_losses / mixture.reference_model"
            )
        self.reference = losses * self.fallback_factor
        self.reference_source = f"fallback: first eval loss x {self.fallback_factor}"
        logger.warning(
            "no reference losses: using the first evaluated loss x %g as the reference (%s)",
            self.fallback_factor, _fmt(self.domains.mapping_from_array(self.reference)),
        )

    def _compute(self, step: int, losses: np.ndarray) -> tuple[np.ndarray | None, dict]:
        """Rank 0 only: the new share weights (None = keep) and the mixture.json record."""
        names = self.domains.mapping_from_array
        record: dict[str, Any] = {"step": int(step), "losses": _named_or_raw(self.domains, losses)}
        bad = first_bad_domain(losses)
        if bad is not None:
            logger.warning(
                "step %d: held-out loss of domain %r is %r; skipping this mixture update (weights kept)",
                step, self.domains.name_of(bad), float(losses[bad]),
            )
            record.update(skipped=f"non-finite or non-positive loss for domain {self.domains.name_of(bad)}",
                          old_weights=names(self.weights), new_weights=names(self.weights))
            return None, record
        prev = self.prev_losses
        if self.target_id is None:
            update = mixture.update_weights(self.weights, self.w0, losses, prev, self.reference, self.rule)
            new = np.asarray(update.new_weights)
            gamma, phi, scores = update.gamma, update.phi, update.scores
        else:
            new, gamma, phi, scores = self._expansion_step(step, losses, prev)
            record["target_share"] = float(new[self.target_id])
        record.update(
            prev_losses=None if prev is None else names(prev),
            ref_losses=None if self.reference is None else names(self.reference),
            gamma=names(gamma), phi=names(phi), scores=names(scores),
            old_weights=names(self.weights), new_weights=names(new),
            item_weights=names(self.item_weights(new)),
        )
        return new, record

    def _expansion_step(
        self, step: int, losses: np.ndarray, prev: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Domain expansion: the target follows its ramp; the other domains split the rest by the γ/φ rule.

        The rule runs on the non-target domains only (their weights, prior, losses renormalised among
        themselves), so the floor and the change cap apply to the others' split of the remaining mass.
        """
        assert self.target_id is not None
        share = mixture.expansion_target_share(
            step, start_share=float(self.w0[self.target_id]), cap=self.target_share, ramp_steps=self.target_ramp_steps
        )
        others = np.arange(len(self.domains)) != self.target_id
        gamma = np.zeros(len(self.domains))
        phi = np.zeros(len(self.domains))
        scores = np.zeros(len(self.domains))
        split = np.zeros(len(self.domains))
        if others.sum() > 0:
            sub_weights = _renormalised(self.weights[others])
            sub_prior = _renormalised(self.w0[others])
            floor = min(self.rule.floor, 1.0 / others.sum())
            sub_rule = mixture.UpdateRule(**{**_rule_fields(self.rule), "floor": floor})
            update = mixture.update_weights(
                sub_weights, sub_prior, losses[others], None if prev is None else prev[others],
                None if self.reference is None else self.reference[others], sub_rule,
            )
            split[others] = update.new_weights
            gamma[others], phi[others], scores[others] = update.gamma, update.phi, update.scores
        return mixture.expansion_weights(split, self.target_id, share), gamma, phi, scores

    # -- mixture.json ----------------------------------------------------------------------

    def header(self) -> dict:
        return {
            "domains": list(self.domains.names),
            "strategy": self.strategy,
            "unit": self.unit,
            "rule": _rule_fields(self.rule),
            "warmup_steps": self.warmup_steps,
            "target_domain": None if self.target_id is None else self.domains.name_of(self.target_id),
            "initial_weights": self.domains.mapping_from_array(self.w0),
            "initial_item_weights": self.domains.mapping_from_array(self.initial_item_weights()),
            "units_per_item": self.domains.mapping_from_array(self.units_per_item),
        }

    def _append_record(self, record: dict) -> None:
        self.records.append(record)
        self.write_mixture_file()

    def write_mixture_file(self) -> None:
        if not self.is_main or self.mixture_path is None:
            return
        document = {
            **self.header(),
            "reference_losses": None if self.reference is None else self.domains.mapping_from_array(self.reference),
            "reference_source": self.reference_source,
            "updates": self.records,
        }
        write_json_atomic(self.mixture_path, document)

    # -- resume ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "domains": list(self.domains.names),
            "strategy": self.strategy,
            "weights": self.weights.tolist(),  # json round-trips float64 exactly (shortest repr)
            "prev_losses": None if self.prev_losses is None else self.prev_losses.tolist(),
            "reference_losses": None if self.reference is None else self.reference.tolist(),
            "reference_source": self.reference_source,
            "num_records": self.num_records,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise UserError(f"mixture policy state has version {state.get('version')!r}, expected {STATE_VERSION}")
        if list(state["domains"]) != list(self.domains.names) or state["strategy"] != self.strategy:
            raise UserError(
                f"the checkpoint's mixture policy was for domains {state['domains']} with strategy "
                f"{state['strategy']!r}, but this run has {list(self.domains.names)} / {self.strategy!r}; "
                "resume with the same data.domains and mixture.strategy or start a new run directory"
            )
        self.weights = np.asarray(state["weights"], dtype=np.float64)
        self.prev_losses = None if state["prev_losses"] is None else np.asarray(state["prev_losses"], dtype=np.float64)
        self.reference = None if state["reference_losses"] is None else np.asarray(state["reference_losses"], dtype=np.float64)
        self.reference_source = state["reference_source"]
        self.num_records = int(state["num_records"])
        if self.is_main and self.mixture_path is not None:
            # Updates written after the checkpoint belong to the abandoned future: drop them.
            existing = _read_json(self.mixture_path).get("updates", []) if self.mixture_path.is_file() else []
            if len(existing) < self.num_records:
                logger.warning("%s holds %d updates, the checkpoint %d; the missing ones are lost",
                               self.mixture_path, len(existing), self.num_records)
            self.records = list(existing[: self.num_records])
            self.write_mixture_file()


# ----------------------------------------------------------------------------------------------
# Construction


def build_weight_policy(
    cfg: RunConfig,
    domains: Domains,
    data: Any,
    run_dir: str | os.PathLike[str] | None,
    env: DistEnv,
    *,
    initial_distribution: np.ndarray | Sequence[float] | None,
    reference_losses: np.ndarray | Sequence[float] | None = None,
    evaluate_model: Callable[[str], np.ndarray] | None = None,
) -> MixturePolicy:
    """The policy for `cfg.mixture`. Call on every rank (reference-model evaluation is collective).

    data: `PreparedData` (per_domain[d].train_rows, .train_tokens, .train_examples).
    initial_distribution: the probed p by domain id (needed by versatune*, inverse).
    reference_losses: ℓ_ref by domain id, when the caller has it already.
    evaluate_model(model_path) -> per-domain held-out losses by id; used for mixture.reference_model.
    run_dir: where mixture.json / reference_losses.json go (None: write nothing, for tests).
    """
    m = cfg.mixture
    n = len(domains)
    units_per_item = units_per_item_from_data(data, m.unit, domains)
    target_id = None if m.target_domain is None else domains.id_of(m.target_domain, key="mixture.target_domain")
    sizes = _domain_sizes(data, m.unit)
    fixed = None if m.weights is None else domains.array_from_mapping(m.weights, key="mixture.weights")
    distribution = None if initial_distribution is None else np.asarray(initial_distribution, dtype=np.float64)
    if distribution is not None and distribution.shape != (n,):
        raise UserError(f"the probed distribution has {distribution.size} values for {n} domains ({', '.join(domains.names)})")
    w0 = mixture.initial_weights(
        m.strategy, distribution=distribution, domain_sizes=sizes, fixed=fixed, floor=m.floor,
        target_id=target_id, target_share=m.target_share, num_domains=n,
    )
    rule = mixture.UpdateRule(
        rule=m.rule, alpha=m.alpha, beta=m.beta, eta=m.eta, smoothing=m.smoothing, floor=m.floor, max_change=m.max_change
    )
    dynamic = m.strategy in DYNAMIC_STRATEGIES
    reference, source = None, "none"
    if dynamic and m.rule == "versatune":
        reference, source = resolve_reference_losses(
            cfg, domains, data, run_dir, env, given=reference_losses, evaluate_model=evaluate_model
        )
    if target_id is not None and not dynamic and m.strategy not in ("target_only", "target_plus_uniform"):
        logger.warning("mixture.target_domain is set but strategy %r is static; the target ramp applies to 'versatune' only", m.strategy)
    policy = MixturePolicy(
        domains=domains, strategy=m.strategy, unit=m.unit, initial_weights=w0, units_per_item=units_per_item,
        rule=rule, warmup_steps=int(m.warmup_steps), reference_losses=reference, reference_source=source,
        fallback_factor=m.reference_fallback_factor, target_id=target_id if dynamic else None,
        target_share=m.target_share, target_ramp_steps=int(m.target_ramp_steps),
        mixture_path=None if run_dir is None else Path(run_dir) / MIXTURE_FILE, is_main=env.is_main,
    )
    if env.is_main:
        logger.info("mixture %s (%s shares): w0 %s", m.strategy, m.unit, _fmt(domains.mapping_from_array(w0)))
    # An existing mixture.json may belong to a run about to resume: leave it until load_state_dict trims it
    # or the first update of a fresh run rewrites it.
    if policy.mixture_path is not None and not policy.mixture_path.exists():
        policy.write_mixture_file()
    return policy


def units_per_item_from_data(data: Any, unit: str, domains: Domains) -> np.ndarray:
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


def _domain_sizes(data: Any, unit: str) -> np.ndarray:
    attribute = "train_tokens" if unit == "tokens" else "train_examples"
    return np.asarray([float(getattr(d, attribute)) for d in data.per_domain], dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# Small helpers


def _named_or_raw(domains: Domains, values: np.ndarray) -> dict[str, float | None]:
    # JSON has no NaN/inf: write them as null so mixture.json stays valid JSON.
    return {name: (float(v) if math.isfinite(float(v)) else None) for name, v in zip(domains.names, values)}


def _renormalised(values: np.ndarray) -> np.ndarray:
    total = values.sum()
    return values / total if total > 0 else np.full(values.size, 1.0 / values.size)


def _rule_fields(rule: mixture.UpdateRule) -> dict:
    return {name: getattr(rule, name) for name in ("rule", "alpha", "beta", "eta", "smoothing", "floor", "max_change")}


def _fmt(mapping: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:.4f}" for name, value in mapping.items())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}; delete the file to start it afresh") from None


def write_json_atomic(path: str | os.PathLike[str], document: Any) -> None:
    """Write JSON to a temporary name in the same folder, then rename (a crash never leaves half a file)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, target)
