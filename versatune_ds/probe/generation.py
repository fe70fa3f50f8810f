"""Probe generation: start-token prompts, the per-rank plan, per-prompt seeded sampling, gather + resume.

N = probe.num_samples prompts, each a lone start token (BOS; EOS when the tokenizer has no BOS -- logged
and recorded as `start_token`). The *remaining* prompt indices (those not yet in probe/generations.jsonl)
are decided on rank 0 and broadcast, split with `dist.even_shard`, and cut into batches of
probe.batch_size. Every rank makes the same number of `generate` calls, ceil(max shard / batch)
(`plan_generation`); under ZeRO-3 a rank with no prompts left runs a dummy call (every forward is a
collective, and `synced_gpus=True` keeps the ranks in step even when their sequences stop at different
lengths). After each call the new generations are gathered to rank 0 and appended to
generations.jsonl, so an interrupted probe resumes where it was.

Sampling is seeded per prompt: prompt i draws every token from its own torch generator seeded with
(train.seed, i) (`PromptSampler`), so a generation depends only on the seed and its index -- not on the
world size, the batch it shares, or whether the probe was resumed (up to floating-point differences of
batched vs. unbatched matmuls, which can very rarely flip a draw). HF's `generate` runs in greedy mode
with our sampler as the last logits processor: it applies temperature, top-k, top-p to the scores
(after HF's repetition penalty) and draws the token, leaving greedy search only that token to pick.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase
from transformers.integrations import is_deepspeed_zero3_enabled

from versatune_ds import dist
from versatune_ds.config.schema import RunConfig
from versatune_ds.dist import DistEnv
from versatune_ds.errors import UserError
from versatune_ds.files import write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

GENERATIONS_FILE = "generations.jsonl"
SETTINGS_FILE = "generation_settings.json"
_PROBE_STREAM = 7  # seed-sequence namespace for the probe's per-prompt generators


@dataclass(frozen=True)
class StartToken:
    token_id: int
    kind: str  # bos | eos
    text: str


def start_token(tokenizer: PreTrainedTokenizerBase) -> StartToken:
    """BOS, or EOS when the tokenizer has no BOS (the choice is logged and written to distribution.json)."""
    if tokenizer.bos_token_id is not None:
        return StartToken(int(tokenizer.bos_token_id), "bos", str(tokenizer.bos_token))
    if tokenizer.eos_token_id is not None:
        logger.warning("the tokenizer has no BOS token; every probe prompt starts from its EOS token %r", tokenizer.eos_token)
        return StartToken(int(tokenizer.eos_token_id), "eos", str(tokenizer.eos_token))
    raise UserError("the tokenizer has neither a BOS nor an EOS token, so the probe has no start token; use another tokenizer")


@dataclass(frozen=True)
class GenerationPlan:
    batches: tuple[tuple[int, ...], ...]  # this rank's prompt indices per call; () = a dummy call
    num_calls: int  # the same on every rank


def plan_generation(remaining: Sequence[int], world_size: int, rank: int, batch_size: int) -> GenerationPlan:
    """This rank's generate calls: an even shard of `remaining`, in batches, padded with dummy calls."""
    shard = [remaining[i] for i in dist.even_shard(len(remaining), world_size, rank)]
    num_calls = math.ceil(math.ceil(len(remaining) / world_size) / batch_size)
    batches = [tuple(shard[start : start + batch_size]) for start in range(0, len(shard), batch_size)]
    batches += [()] * (num_calls - len(batches))
    return GenerationPlan(tuple(batches), num_calls)


def prompt_seed(seed: int, index: int) -> int:
    """The torch seed of prompt `index` (a 63-bit integer from a SeedSequence; index -1 = dummy prompts)."""
    words = np.random.SeedSequence([seed, _PROBE_STREAM, index + 1]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class PromptSampler:
    """Logits processor that samples each row with its own generator and returns a one-hot score row."""

    def __init__(self, seeds: Sequence[int], *, temperature: float, top_k: int, top_p: float) -> None:
        self.seeds = list(seeds)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generators: list[torch.Generator] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.generators:  # created lazily, on the device the scores live on
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        logits = scores.float() / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            sorted_probs = torch.softmax(sorted_logits, dim=-1)
            # Drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays).
            drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= self.top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        chosen = [torch.multinomial(probs[row], 1, generator=self.generators[row]) for row in range(probs.shape[0])]
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, torch.stack(chosen), 0.0)
        return out


def generate_batch(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, start: StartToken, indices: Sequence[int], cfg: RunConfig,
    *, synced_gpus: bool,
) -> list[dict[str, Any]]:
    """One `generate` call for prompt `indices` (empty: a one-row dummy call whose output is dropped)."""
    probe = cfg.probe
    rows = list(indices) or [-1]
    device = next(model.parameters()).device
    input_ids = torch.full((len(rows), 1), start.token_id, dtype=torch.long, device=device)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = GenerationConfig(
        do_sample=False, max_new_tokens=probe.max_new_tokens, repetition_penalty=probe.repetition_penalty,
        eos_token_id=eos, pad_token_id=pad, bos_token_id=tokenizer.bos_token_id,
    )
    sampler = PromptSampler(
        [prompt_seed(cfg.train.seed, i) for i in rows], temperature=probe.temperature, top_k=probe.top_k, top_p=probe.top_p
    )
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
            logits_processor=[sampler], synced_gpus=synced_gpus,
        )
    records = []
    for row, index in enumerate(indices):
        new_tokens = output[row, 1:].tolist()
        if eos is not None and eos in new_tokens:
            new_tokens = new_tokens[: new_tokens.index(eos)]
        text = tokenizer.decode(new_tokens, skip_special_tokens=True)
        records.append({"index": int(index), "text": text, "num_tokens": len(new_tokens)})
    return records


# ----------------------------------------------------------------------------------------------
# Resume


def read_generations(path: Path, num_samples: int) -> dict[int, dict]:
    """Generations already written (index < num_samples). A torn last line (crash mid-write) is dropped."""
    done: dict[int, dict] = {}
    if not path.is_file():
        return done
    lines = path.read_text(encoding="utf-8").splitlines()
    good = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            index = int(record["index"])
            str(record["text"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if number == len(lines):
                logger.warning("%s:%d is incomplete (interrupted write); generating that prompt again", path, number)
                break
            raise UserError(f"{path}:{number}: not a generation record; delete the file to probe afresh") from None
        good.append(line)
        if index < num_samples:
            done[index] = record
    if len(good) < len(lines):
        write_text_atomic(path, "".join(f"{line}\n" for line in good))
    return done


def _check_settings(probe_dir: Path, settings: dict, has_generations: bool) -> None:
    path = probe_dir / SETTINGS_FILE
    if has_generations and path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed:
            raise UserError(
                f"{probe_dir / GENERATIONS_FILE} was generated with other settings ({', '.join(changed)} changed); "
                f"delete {probe_dir} to probe again, or restore the settings"
            )
    write_json_atomic(path, settings)


# ----------------------------------------------------------------------------------------------
# Generation on all ranks


def generate_all(
    cfg: RunConfig, env: DistEnv, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, probe_dir: Path, *, zero3: bool
) -> list[dict[str, Any]]:
    """Generate the missing prompts; returns every generation (sorted by index) on rank 0, [] elsewhere."""
    start = start_token(tokenizer)
    path = probe_dir / GENERATIONS_FILE
    remaining: list[int] | None = None
    done: dict[int, dict] = {}
    if env.is_main:
        probe_dir.mkdir(parents=True, exist_ok=True)
        done = read_generations(path, cfg.probe.num_samples)
        _check_settings(probe_dir, _generation_settings(cfg, start), bool(done))
        remaining = [i for i in range(cfg.probe.num_samples) if i not in done]
        logger.info("probe: %d of %d generations on disk, %d to go (start token %s %r)",
                    len(done), cfg.probe.num_samples, len(remaining), start.kind, start.text)
    remaining = dist.broadcast_object(remaining)
    plan = plan_generation(remaining, env.world_size, env.rank, cfg.probe.batch_size)
    # HF would switch synced_gpus on by itself for a ZeRO-3 model; decide it here so the dummy calls agree.
    synced = env.is_distributed and (zero3 or _zero3_active())
    for call, batch in enumerate(plan.batches):
        # A replica has no collectives inside generate, so a rank with nothing left skips its dummy call.
        records = generate_batch(model, tokenizer, start, batch, cfg, synced_gpus=synced) if batch or synced else []
        gathered = dist.all_gather_objects(records)
        if env.is_main:
            new = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
            with path.open("a", encoding="utf-8") as handle:
                handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
                handle.flush()
                os.fsync(handle.fileno())
            done.update((r["index"], r) for r in new)
            logger.info("probe: call %d/%d, %d/%d generations", call + 1, plan.num_calls, len(done), cfg.probe.num_samples)
    return [done[i] for i in sorted(done)] if env.is_main else []


def _zero3_active() -> bool:
    return bool(is_deepspeed_zero3_enabled())


def _generation_settings(cfg: RunConfig, start: StartToken) -> dict:
    p = cfg.probe
    return {
        "model": cfg.model.path, "gguf_file": cfg.model.gguf_file, "seed": cfg.train.seed, "start_token": start.text,
        "max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
        "repetition_penalty": p.repetition_penalty,
    }
