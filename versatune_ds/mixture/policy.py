"""The train-time mixture policy: initial composition, dynamic γ/φ re-weighting, domain expansion.

`mixture.build.build_weight_policy(...)` turns the config, the probed distribution and the prepared data
into a `MixturePolicy`. The training loop calls, on every rank:

    policy.initial_sampler_weights()       -> the weights at step 0
    policy.after_eval(step, result)        -> new weights, or None (no change), after each evaluation

Weights are *share weights* w: each domain's share of training tokens (mixture.unit=tokens) or of training
examples (mixture.unit=examples). The sampler takes them as they are: it apportions tokens (or examples)
exactly, counting each row's size (mixture.sampler, unit tokens / examples), so no conversion to row
probabilities is needed and what mixture.json records is what the model sees.

`result` is the held-out evaluation (eval.heldout.DomainLosses): the per-domain losses and every scored
example's loss, from which the policy takes the standard errors of the two differences the rule uses --
ℓ − ℓ_ref for γ and ℓ(t) − ℓ(t−1) for φ -- paired over the examples where both sides scored the same
ones (mixture.rules: the noise margin).

Decisions are made once: rank 0 computes the update and `dist.broadcast_array` sends it to every rank,
so all ranks hold bit-identical weights (DESIGN.md §4). The payload carries a leading flag so "no
change" (None) is also decided by rank 0 alone.

Reference losses ℓ_ref (for γ) come from mixture.reference: given, mixture.reference_losses,
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
from pathlib import Path
from typing import Any

import numpy as np

from versatune_ds import dist
from versatune_ds.domains import Domains
from versatune_ds.errors import UserError
from versatune_ds.eval.heldout import DomainLosses, ItemLosses, difference_se
from versatune_ds.files import write_json_atomic
from versatune_ds.mixture import rules
from versatune_ds.mixture.reference import first_bad_domain

logger = logging.getLogger(__name__)

MIXTURE_FILE = "mixture.json"
STATE_VERSION = 2
DYNAMIC_STRATEGIES = ("versatune",)


class MixturePolicy:
    """Every strategy in one class (a `protocols.WeightPolicy`): static strategies never change their weights.

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
        rule: rules.UpdateRule,
        warmup_steps: int,
        reference_losses: np.ndarray | None,
        reference_source: str,
        reference_items: tuple[ItemLosses, ...] | None = None,
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
        # The examples ℓ_ref was measured on (a reference model's or the first evaluation's), for paired errors;
        # ℓ_ref = reference_scale × their loss. None: given as numbers (no error).
        self.reference_items = reference_items
        self.reference_scale = 1.0
        self.fallback_factor = fallback_factor
        self.target_id = target_id
        self.target_share = target_share
        self.target_ramp_steps = target_ramp_steps
        self.mixture_path = mixture_path
        self.is_main = is_main
        self.dynamic = strategy in DYNAMIC_STRATEGIES
        self.weights = self.w0.copy()
        self.prev_losses: np.ndarray | None = None
        self.prev_items: tuple[ItemLosses, ...] | None = None
        self.records: list[dict] = []
        self.num_records = 0

    # -- sampler side ----------------------------------------------------------------------

    def initial_sampler_weights(self) -> np.ndarray:
        """w0, shares of mixture.unit, which the sampler apportions as they are."""
        return self.w0.copy()

    def weights_by_name(self) -> dict[str, float]:
        return self.domains.mapping_from_array(self.weights)

    def metrics(self) -> dict[str, float]:
        """`mixture/<domain>/weight` (share weights) for the metrics log."""
        return {f"mixture/{name}/weight": value for name, value in self.weights_by_name().items()}

    # -- the update ------------------------------------------------------------------------

    def after_eval(self, step: int, result: DomainLosses) -> np.ndarray | None:
        """Called on every rank with identical results; returns identical new weights or None everywhere."""
        losses = np.asarray(result.loss, dtype=np.float64)
        if losses.shape != (len(self.domains),):
            raise ValueError(f"after_eval: expected {len(self.domains)} losses, got shape {losses.shape}")
        items = result.items or None
        if self.reference is None and self.dynamic and self.rule.rule == "versatune":
            self._set_fallback_reference(losses, items)  # deterministic from identical losses: same on every rank
        if not self.dynamic or step < self.warmup_steps:
            self._remember(losses, items)
            return None
        size = len(self.domains) + 1
        payload = None
        if self.is_main:
            new_weights, record = self._compute(step, losses, items)
            flag = 0.0 if new_weights is None else 1.0
            payload = np.concatenate([[flag], self.weights if new_weights is None else new_weights])
            self._append_record(record)
        received = dist.broadcast_array(payload, size)
        self.num_records += 1
        self._remember(losses, items)
        if received[0] == 0.0:
            return None
        self.weights = received[1:].copy()
        if self.is_main:
            logger.info("step %d: new mixture weights %s", step, format_weights(self.weights_by_name()))
        return self.weights.copy()

    def _remember(self, losses: np.ndarray, items: tuple[ItemLosses, ...] | None) -> None:
        # φ compares with the previous *valid* evaluation; a broken one is not a baseline.
        if first_bad_domain(losses) is None:
            self.prev_losses = losses.copy()
            self.prev_items = items

    def difference_errors(
        self, items: tuple[ItemLosses, ...] | None
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Standard errors of ℓ − ℓ_ref (γ) and ℓ(t) − ℓ(t−1) (φ) per domain; None where unknown."""
        if items is None:
            return None, None
        gamma_se = None
        if self.reference is not None:
            if self.reference_items is None:  # given as numbers: only this evaluation's sampling error
                gamma_se = np.asarray([i.se for i in items])
            else:
                gamma_se = np.asarray([difference_se(a, b, self.reference_scale) for a, b in zip(items, self.reference_items)])
        phi_se = None
        if self.prev_items is not None:
            phi_se = np.asarray([difference_se(a, b) for a, b in zip(items, self.prev_items)])
        return gamma_se, phi_se

    def _set_fallback_reference(self, losses: np.ndarray, items: tuple[ItemLosses, ...] | None) -> None:
        bad = first_bad_domain(losses)
        if bad is not None:
            raise UserError(
                f"the first held-out loss of domain {self.domains.name_of(bad)!r} is {float(losses[bad])!r}; with no "
                "reference losses it would be the fallback reference and must be finite and > 0 -- check that "
                "domain's held-out set, or set mixture.reference_losses / mixture.reference_model"
            )
        self.reference = losses * self.fallback_factor
        self.reference_items, self.reference_scale = items, self.fallback_factor
        self.reference_source = f"fallback: first eval loss x {self.fallback_factor}"
        logger.warning(
            "no reference losses: using the first evaluated loss x %g as the reference (%s)",
            self.fallback_factor, format_weights(self.domains.mapping_from_array(self.reference)),
        )

    def _compute(self, step: int, losses: np.ndarray, items: tuple[ItemLosses, ...] | None) -> tuple[np.ndarray | None, dict]:
        """Rank 0 only: the new share weights (None = keep) and the mixture.json record."""
        names = self.domains.mapping_from_array
        record: dict[str, Any] = {"step": int(step), "losses": _named_or_raw(self.domains, losses)}
        if items is not None:
            record["loss_se"] = _named_or_raw(self.domains, np.asarray([i.se for i in items]))
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
        gamma_se, phi_se = self.difference_errors(items)
        if self.target_id is None:
            update = rules.update_weights(
                self.weights, self.w0, losses, prev, self.reference, self.rule, gamma_se=gamma_se, phi_se=phi_se
            )
            new = np.asarray(update.new_weights)
            gamma, phi, scores = update.gamma, update.phi, update.scores
        else:
            new, gamma, phi, scores = self._expansion_step(step, losses, prev, gamma_se, phi_se)
            record["target_share"] = float(new[self.target_id])
        record.update(
            prev_losses=None if prev is None else names(prev),
            ref_losses=None if self.reference is None else names(self.reference),
            gamma=names(gamma), phi=names(phi), scores=names(scores),
            gamma_se=None if gamma_se is None else _named_or_raw(self.domains, gamma_se),
            phi_se=None if phi_se is None else _named_or_raw(self.domains, phi_se),
            old_weights=names(self.weights), new_weights=names(new),
        )
        return new, record

    def _expansion_step(
        self, step: int, losses: np.ndarray, prev: np.ndarray | None, gamma_se: np.ndarray | None, phi_se: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Domain expansion: the target follows its ramp; the other domains split the rest by the γ/φ rule.

        The rule runs on the non-target domains only (their weights, prior, losses renormalised among
        themselves), so the floor and the change cap apply to the others' split of the remaining mass.
        """
        assert self.target_id is not None
        share = rules.expansion_target_share(
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
            sub_rule = rules.UpdateRule(**{**_rule_fields(self.rule), "floor": floor})
            update = rules.update_weights(
                sub_weights, sub_prior, losses[others], None if prev is None else prev[others],
                None if self.reference is None else self.reference[others], sub_rule,
                gamma_se=None if gamma_se is None else gamma_se[others], phi_se=None if phi_se is None else phi_se[others],
            )
            split[others] = update.new_weights
            gamma[others], phi[others], scores[others] = update.gamma, update.phi, update.scores
        return rules.expansion_weights(split, self.target_id, share), gamma, phi, scores

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
            # The sampler apportions these shares of `unit` as they are (mixture.sampler); for reading only:
            "mean_units_per_row": self.domains.mapping_from_array(self.units_per_item),
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
            "prev_items": _items_json(self.prev_items),
            "reference_losses": None if self.reference is None else self.reference.tolist(),
            "reference_source": self.reference_source,
            "reference_items": _items_json(self.reference_items),
            "reference_scale": self.reference_scale,
            "num_records": self.num_records,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise UserError(
                f"mixture policy state has version {state.get('version')!r}, expected {STATE_VERSION}: the checkpoint was "
                "written by another versatune-ds version (version 1: before held-out standard errors) and cannot be "
                "resumed exactly; start a new train.run_dir"
            )
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
        self.prev_items = _items_from_json(state["prev_items"])
        self.reference_items = _items_from_json(state["reference_items"])
        self.reference_scale = float(state["reference_scale"])
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
# Small helpers


def _named_or_raw(domains: Domains, values: np.ndarray) -> dict[str, float | None]:
    # JSON has no NaN/inf: write them as null so mixture.json stays valid JSON.
    return {name: (float(v) if math.isfinite(float(v)) else None) for name, v in zip(domains.names, values)}


def _items_json(items: tuple[ItemLosses, ...] | None) -> list[dict] | None:
    return None if items is None else [i.to_json() for i in items]


def _items_from_json(data: list[dict] | None) -> tuple[ItemLosses, ...] | None:
    return None if data is None else tuple(ItemLosses.from_json(i) for i in data)


def _renormalised(values: np.ndarray) -> np.ndarray:
    total = values.sum()
    return values / total if total > 0 else np.full(values.size, 1.0 / values.size)


def _rule_fields(rule: rules.UpdateRule) -> dict:
    return {name: getattr(rule, name) for name in ("rule", "alpha", "beta", "eta", "smoothing", "floor", "max_change", "noise_k")}


def format_weights(mapping: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:.4f}" for name, value in mapping.items())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}; delete the file to start it afresh") from None
