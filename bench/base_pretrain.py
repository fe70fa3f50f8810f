"""Pretraining of the controlled base: until every domain's held-out raw-text loss is within 5 % of its plateau.

A plain torch loop (a benchmark fixture, not the product's training path), resumable, one process:

- **Data.** Rows of `seq_len` tokens packed with whole documents, each BOS + document + EOS (a document
  longer than a row is cut; the last document of a row is cut to the room left when at least
  `min_piece_tokens` remain). `position_ids` restart at every document and no attention mask is passed, so
  transformers builds a block-diagonal causal mask: a document never sees another (as in
  versatune_ds.data.packing). The domain of each document is drawn with the known shares (`truth`), the
  document uniformly within its domain, from a generator seeded by `seed`. BOS is never a label.
- **Schedule** (warmup-stable-decay): linear warmup, constant peak learning rate, then -- once the plateau
  rule fires or the step budget is spent -- a linear decay to 0 over `cooldown_fraction` of the steps so far.
  The rule needs no total length fixed in advance, and the decay recovers what a constant rate leaves on
  the table (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training beyond Fixed Training Durations").
- **Plateau rule.** Every `eval_every` steps the held-out raw-text loss of each domain is measured on
  passages the loop never trains on. A domain's *plateau* is the asymptote c of L(t) = c + a·t^(−α) fitted
  to its evaluations after the warmup (t ≥ 2 x warmup; versatune_ds.eval.stats.fit_plateau), or its lowest
  loss once the curve rises again (overfitting). The decay starts, after at least `min_steps`, when for
  every domain both hold:
    (a) the fit: (latest loss − plateau) / plateau ≤ `tolerance` (5 %);
    (b) the measurement: the relative gain over the last doubling of steps, (L(t/2) − L(t)) / L(t), is at
        most tolerance·(2^0.5 − 1)/(1 + tolerance) ≈ 1.97 % -- which under a power law with exponent ≥ 0.5
        leaves at most 5 % to gain, and which a rising (overfitting) curve meets at once.
  (b) guards (a) against a fit that extrapolates too little; (a) guards (b) against a flat stretch that is
  not the end. Both are conservative: they wait rather than stop early.
- **Resume.** After every evaluation the model, optimizer, data generator and curve are saved atomically
  (`state.pt`); a killed run restarts from there and continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from versatune_ds.data.packing import Example
from versatune_ds.engine.losses import token_loss_sum
from versatune_ds.eval import stats
from versatune_ds.files import write_bytes_atomic

logger = logging.getLogger("base_pretrain")


@dataclass(frozen=True)
class PretrainSettings:
    seq_len: int = 256
    batch_rows: int = 16  # 4096 tokens per step
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    eval_every: int = 100
    min_steps: int = 800
    max_steps: int = 5_000  # the budget cap: the decay starts here even without a plateau (reported)
    tolerance: float = 0.05
    cooldown_fraction: float = 0.2
    min_piece_tokens: int = 32


def encode_docs(tokenizer: object, docs: Sequence[Sequence[str]], seq_len: int) -> list[list[np.ndarray]]:
    out = []
    for texts in docs:
        ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        out.append([np.asarray([tokenizer.bos_token_id] + x[: seq_len - 2] + [tokenizer.eos_token_id], dtype=np.int64) for x in ids])
    return out


def make_batch(encoded: list[list[np.ndarray]], shares: np.ndarray, rng: np.random.Generator, settings: PretrainSettings,
               pad_token_id: int) -> tuple[dict[str, torch.Tensor], int]:
    """`batch_rows` packed rows; returns the batch and its number of real tokens."""
    T = settings.seq_len
    ids = np.full((settings.batch_rows, T), pad_token_id, dtype=np.int64)
    labels = np.full((settings.batch_rows, T), -100, dtype=np.int64)
    positions = np.zeros((settings.batch_rows, T), dtype=np.int64)
    real = 0
    for row in range(settings.batch_rows):
        at = 0
        while T - at >= settings.min_piece_tokens:
            domain = rng.choice(len(shares), p=shares)
            doc = encoded[domain][rng.integers(len(encoded[domain]))][: T - at]
            n = doc.shape[0]
            ids[row, at : at + n] = doc
            labels[row, at + 1 : at + n] = doc[1:]  # BOS (the document's first token) is never predicted
            positions[row, at : at + n] = np.arange(n)
            at += n
        positions[row, at:] = np.arange(T - at)  # padding: one more (label-free) segment
        real += at
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels), "position_ids": torch.from_numpy(positions)}, real


def learning_rate(step: int, settings: PretrainSettings, cooldown: tuple[int, int] | None) -> float:
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    if cooldown is None:
        return settings.lr
    start, end = cooldown
    return settings.lr * max(0.0, (end - step) / max(1, end - start))


# The doubling rule's bound: under L = c + a·t^(−α), the gain over the last doubling of steps g and the gap to the
# plateau satisfy gap = g / (2^α − 1 − g); with α ≥ MIN_EXPONENT a gap ≤ tolerance needs g ≤ tolerance·(2^α − 1)/(1 + tolerance).
MIN_EXPONENT = 0.5


def doubling_bound(tolerance: float) -> float:
    return tolerance * (2**MIN_EXPONENT - 1) / (1 + tolerance)


def plateau_fits(evals: list[dict], num_domains: int, warmup_steps: int) -> list[stats.PlateauFit] | None:
    """Per-domain power-law fits over the stable phase's evaluations after the warmup (None: fewer than 5 points).

    All points from 2 x warmup on are used: a short window leaves the exponent and the asymptote free to trade
    off against each other (a nearly straight curve in log t fits a tiny exponent and an asymptote near 0)."""
    window = [e for e in evals if e["phase"] == "stable" and e["step"] >= 2 * warmup_steps]
    if len(window) < 5:
        return None
    steps = np.array([e["step"] for e in window], dtype=np.float64)
    return [stats.fit_plateau(steps, [e["loss"][d] for e in window]) for d in range(num_domains)]


def doubling_gains(evals: list[dict], num_domains: int) -> list[float] | None:
    """(L(t/2) − L(t)) / L(t) per domain: the measured relative gain over the last doubling of steps."""
    stable = [e for e in evals if e["phase"] == "stable" and e["step"] > 0]
    last = stable[-1]
    earlier = [e for e in stable if e["step"] <= last["step"] / 2]
    if not earlier:
        return None
    half = earlier[-1]
    return [(half["loss"][d] - last["loss"][d]) / last["loss"][d] for d in range(num_domains)]


def evaluate(model: torch.nn.Module, heldout: Sequence[Sequence[Example]], pad_token_id: int) -> tuple[list[float], list[float]]:
    import domain_eval

    losses, errors = [], []
    with torch.no_grad():
        for examples in heldout:
            mean, se = domain_eval.score(model, examples, pad_token_id=pad_token_id).mean_se()
            losses.append(mean)
            errors.append(se)
    return losses, errors


def _save(state_path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, record: dict) -> None:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "record": json.dumps(record)}, buffer)
    write_bytes_atomic(state_path, buffer.getvalue())


def pretrain(model_dir: Path, docs: Sequence[Sequence[str]], shares: Sequence[float], heldout: Sequence[Sequence[Example]],
             settings: PretrainSettings, *, seed: int, state_dir: Path) -> dict:
    """Train `model_dir` in place until the plateau rule and the decay are done; returns the record (curve, budget)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    shares = np.asarray(shares, dtype=np.float64)
    encoded = encode_docs(tokenizer, docs, settings.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay)
    rng = np.random.default_rng([seed, 11])
    torch.manual_seed(seed)
    state_path = state_dir / "state.pt"
    record: dict = {"settings": asdict(settings), "seed": seed, "step": 0, "tokens": 0, "seconds": 0.0, "evals": [],
                    "cooldown": None, "stop_reason": None, "done": False, "sessions": 0,
                    "doc_tokens": [int(sum(x.shape[0] for x in e)) for e in encoded], "docs": [len(e) for e in encoded]}
    if state_path.is_file():
        saved = torch.load(state_path, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        record = json.loads(saved["record"])
        rng.bit_generator.state = record.pop("rng")
        logger.info("resumed pretraining at step %d (%.0f s so far)", record["step"], record["seconds"])
    record["sessions"] += 1
    model.train()
    clock = time.perf_counter()
    window: list[float] = []
    while True:
        step = record["step"]
        if step % settings.eval_every == 0 and (not record["evals"] or record["evals"][-1]["step"] != step):
            losses, errors = evaluate(model, heldout, tokenizer.pad_token_id)
            record["seconds"] += time.perf_counter() - clock
            clock = time.perf_counter()
            phase = "stable" if record["cooldown"] is None else "cooldown"
            entry = {"step": step, "tokens": record["tokens"], "seconds": round(record["seconds"], 1), "phase": phase,
                     "lr": learning_rate(step, settings, record["cooldown"]), "loss": losses, "se": errors,
                     "train_loss": float(np.mean(window)) if window else None, "load_avg": list(os.getloadavg())}
            window = []
            record["evals"].append(entry)
            fits = plateau_fits(record["evals"], len(heldout), settings.warmup_steps) if phase == "stable" else None
            gains = doubling_gains(record["evals"], len(heldout)) if phase == "stable" else None
            if fits is not None:
                entry["plateau"] = [f.plateau for f in fits]
                entry["gap"] = [f.gap for f in fits]
                entry["exponent"] = [f.exponent for f in fits]
            if gains is not None:
                entry["doubling_gain"] = gains
            logger.info("step %d tokens %.1fM %.0f s | raw loss %s | gap %s | doubling gain %s", step, record["tokens"] / 1e6,
                        record["seconds"], " ".join(f"{x:.3f}" for x in losses),
                        " ".join(f"{g:.3f}" for g in entry.get("gap", [])) or "-", " ".join(f"{g:.3f}" for g in gains or []) or "-")
            if phase == "stable" and step >= settings.min_steps:
                reached = (fits is not None and gains is not None and max(f.gap for f in fits) <= settings.tolerance
                           and max(gains) <= doubling_bound(settings.tolerance))
                if reached or step >= settings.max_steps:
                    length = int(np.ceil(settings.cooldown_fraction * step / settings.eval_every)) * settings.eval_every
                    record["cooldown"] = [step, step + length]
                    record["stop_reason"] = "plateau" if reached else "budget"
                    record["plateau_step"] = {"step": step, "tokens": record["tokens"], "seconds": record["seconds"]}
            elif phase == "cooldown" and step >= record["cooldown"][1]:
                record["done"] = True
            record["rng"] = rng.bit_generator.state
            _save(state_path, model, optimizer, record)
            record.pop("rng")
            if record["done"]:
                break
        lr = learning_rate(step, settings, record["cooldown"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch, real = make_batch(encoded, shares, rng, settings, tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        count = int((batch["labels"][:, 1:] != -100).sum())
        loss = token_loss_sum(logits, batch["labels"]) / count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window.append(float(loss.detach()))
        record["step"] += 1
        record["tokens"] += real
    model.save_pretrained(model_dir, safe_serialization=True)
    return record


def plot_curves(record: dict, domains: Sequence[str], truth: dict[str, float], path: Path) -> None:
    """Held-out raw-text loss per domain vs training tokens, the plateau estimates, and where the decay began."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    evals = [e for e in record["evals"] if e["step"] > 0]
    tokens = np.array([e["tokens"] for e in evals]) / 1e6
    figure = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(figure)
    ax, ax2 = figure.subplots(1, 2)
    last_fit = next((e for e in reversed(record["evals"]) if "plateau" in e), None)
    for d, name in enumerate(domains):
        loss = np.array([e["loss"][d] for e in evals])
        se = np.array([e["se"][d] for e in evals])
        ax.plot(tokens, loss, color=f"C{d}", label=f"{name} (share {truth[name]:.2f})")
        ax.fill_between(tokens, loss - 2 * se, loss + 2 * se, color=f"C{d}", alpha=0.15)
        if last_fit is not None:
            ax.axhline(last_fit["plateau"][d], color=f"C{d}", linestyle=":", linewidth=1)
    if record.get("cooldown"):
        start = next(e["tokens"] for e in record["evals"] if e["step"] == record["cooldown"][0]) / 1e6
        for a in (ax, ax2):
            a.axvline(start, color="black", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("held-out raw-text loss (nats/token), ±2 SE")
    ax.set_title("per-domain raw-text loss; dotted: fitted plateau; dashed: decay starts")
    ax.legend(fontsize=7)
    train = [(e["tokens"] / 1e6, e["train_loss"]) for e in evals if e["train_loss"] is not None]
    ax2.plot([t for t, _ in train], [v for _, v in train], color="black")
    ax2.set_xscale("log")
    ax2.set_xlabel("training tokens (M)")
    ax2.set_ylabel("training loss (mean since the last evaluation)")
    lr_axis = ax2.twinx()
    lr_axis.plot(tokens, [e["lr"] for e in evals], color="grey", linestyle=":")
    lr_axis.set_ylabel("learning rate (dotted)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
