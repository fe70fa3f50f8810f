"""`versatune-ds probe`: estimate the base model's knowledge distribution over the domains.

1. Generate. N = probe.num_samples prompts, each a lone start token (BOS; EOS when the tokenizer has
   no BOS -- logged and recorded as `start_token`). The *remaining* prompt indices (those not yet in
   probe/generations.jsonl) are decided on rank 0 and broadcast, split with `dist.even_shard`, and cut
   into batches of probe.batch_size. Every rank makes the same number of `generate` calls,
   ceil(max shard / batch) (`plan_generation`); in zero3 mode a rank with no prompts left runs a dummy
   call (under ZeRO-3 every forward is a collective and `synced_gpus=True` keeps the ranks in step
   even when their sequences stop at different lengths). After each call the new generations are
   gathered to rank 0 and appended to generations.jsonl, so an interrupted probe resumes where it was.
2. Classify every generation (TF-IDF classifier trained on the domains' texts by default, or an LLM
   judge) and estimate p with a bootstrap CI; write probe/distribution.json.

Sampling is seeded per prompt: prompt i draws every token from its own torch generator seeded with
(train.seed, i) (`PromptSampler`), so a generation depends only on the seed and its index -- not on the
world size, the batch it shares, or whether the probe was resumed (up to floating-point differences of
batched vs. unbatched matmuls, which can very rarely flip a draw). HF's `generate` runs in greedy mode
with our sampler as the last logits processor: it applies temperature, top-k, top-p to the scores
(after HF's repetition penalty) and draws the token, leaving greedy search only that token to pick.

This is a command module: torch / transformers / deepspeed are imported inside functions only.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from versatune_ds import dist
from versatune_ds.domains import Domains
from versatune_ds.errors import UserError
from versatune_ds.weighting import write_json_atomic

if TYPE_CHECKING:
    import argparse

    from versatune_ds.config import RunConfig
    from versatune_ds.dist import DistEnv

logger = logging.getLogger(__name__)

PROBE_DIR = "probe"
GENERATIONS_FILE = "generations.jsonl"
SETTINGS_FILE = "generation_settings.json"
DISTRIBUTION_FILE = "distribution.json"
CLASSIFIER_DIR = "classifier"
CLASSIFIER_REPORT_FILE = "classifier_report.json"
HELDOUT_FRACTION = 0.2  # of the classifier's texts, per domain, for its accuracy report
_PROBE_STREAM = 7  # seed-sequence namespace for the probe's per-prompt generators


@dataclass(frozen=True)
class StartToken:
    token_id: int
    kind: str  # bos | eos
    text: str


def start_token(tokenizer: Any) -> StartToken:
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
        self.generators: list[Any] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

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


def generate_batch(model: Any, tokenizer: Any, start: StartToken, indices: Sequence[int], cfg: RunConfig, *, synced_gpus: bool) -> list[dict]:
    """One `generate` call for prompt `indices` (empty: a one-row dummy call whose output is dropped)."""
    import torch
    from transformers import GenerationConfig

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
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in good), encoding="utf-8")
        os.replace(tmp, path)
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


def generate_all(cfg: RunConfig, env: DistEnv, model: Any, tokenizer: Any, probe_dir: Path, *, zero3: bool) -> list[dict]:
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
    synced = zero3 and env.is_distributed
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


def _generation_settings(cfg: RunConfig, start: StartToken) -> dict:
    p = cfg.probe
    return {
        "model": cfg.model.path, "gguf_file": cfg.model.gguf_file, "seed": cfg.train.seed, "start_token": start.text,
        "max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
        "repetition_penalty": p.repetition_penalty,
    }


def load_probe_model(cfg: RunConfig, env: DistEnv, model_path: str, *, zero3: bool) -> tuple[Any, Any]:
    """(model ready for generate, object to keep alive). zero3: partitioned through DeepSpeed (CPU_FACTS)."""
    import torch
    from transformers import AutoModelForCausalLM

    from versatune_ds.ds_config import resolve_dtype_name

    cuda = torch.cuda.is_available()
    dtype_name = resolve_dtype_name(cfg.model.dtype, cuda=cuda)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.gguf_file and model_path == cfg.model.path:
        kwargs["gguf_file"] = cfg.model.gguf_file
    if not zero3:
        model = _from_pretrained(AutoModelForCausalLM, model_path, kwargs)
        device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
        return model.to(device).eval(), None
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    ds_config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1, "train_batch_size": env.world_size, "steps_per_print": 1_000_000,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    if dtype_name != "fp32":
        ds_config[dtype_name] = {"enabled": True}
    # The HfDeepSpeedConfig must stay referenced while the model loads so from_pretrained partitions the weights.
    keep = HfDeepSpeedConfig(ds_config)
    model = _from_pretrained(AutoModelForCausalLM, model_path, kwargs)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.module.eval()
    return engine.module, (keep, engine)


def _from_pretrained(auto_class: Any, path: str, kwargs: dict) -> Any:
    try:
        return auto_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a model from {path!r} for the probe: {exc}") from None


# ----------------------------------------------------------------------------------------------
# Classification and the distribution


@dataclass(frozen=True)
class ProbeResult:
    p: np.ndarray  # by domain id, on every rank
    ci_low: np.ndarray
    ci_high: np.ndarray
    num_texts: int
    distribution_path: Path


def train_probe_classifier(cfg: RunConfig, domains: Domains, probe_dir: Path) -> Any:
    """Rank 0: the TF-IDF classifier (loaded from classifier.path, or trained on data.domain_texts with a
    fixed-seed per-domain hold-out whose accuracy and confusion go to classifier_report.json)."""
    from versatune_ds.classify import TfidfDomainClassifier, evaluate_classifier, train_tfidf_classifier

    if cfg.classifier.path:
        return TfidfDomainClassifier.load(cfg.classifier.path, domain_names=domains.names)
    from versatune_ds.data import domain_texts

    texts, labels = domain_texts(cfg)
    train_ids, test_ids = heldout_split(np.asarray(labels), HELDOUT_FRACTION, cfg.train.seed)
    classifier = train_tfidf_classifier(
        [texts[i] for i in train_ids], [labels[i] for i in train_ids], len(domains), seed=cfg.train.seed,
        domain_names=domains.names,
    )
    classifier.save(probe_dir / CLASSIFIER_DIR)
    report = evaluate_classifier(classifier, [texts[i] for i in test_ids], [labels[i] for i in test_ids])
    write_json_atomic(probe_dir / CLASSIFIER_REPORT_FILE, {
        "domains": list(domains.names), "accuracy": report.accuracy, "confusion": report.confusion,
        "precision": list(report.precision), "recall": list(report.recall), "num_test_texts": report.num_examples,
        "num_train_texts": len(train_ids), "heldout_fraction": HELDOUT_FRACTION, "seed": cfg.train.seed,
        "note": "held out from the classifier's own training texts (train + raw sources); generations of a base "
                "model are another style of text, where accuracy is usually lower",
    })
    logger.info("probe classifier: held-out accuracy %.3f on %d texts", report.accuracy, report.num_examples)
    return classifier


def heldout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, test) positions: `fraction` of each domain's texts held out, chosen by a seeded permutation."""
    rng = np.random.default_rng([seed, _PROBE_STREAM])
    train: list[int] = []
    test: list[int] = []
    for domain_id in np.unique(labels):
        members = np.flatnonzero(labels == domain_id)
        members = members[rng.permutation(members.size)]
        cut = int(round(members.size * fraction)) if members.size > 1 else 0
        test.extend(members[:cut].tolist())
        train.extend(members[cut:].tolist())
    return sorted(train), sorted(test)


def judge_probabilities(cfg: RunConfig, env: DistEnv, domains: Domains, texts: list[str] | None, *, zero3: bool) -> np.ndarray | None:
    """LLM-judge probabilities, texts split across ranks with equal forward counts; the matrix on rank 0."""
    from versatune_ds.data import load_tokenizer
    from versatune_ds.judge import LlmJudgeClassifier

    if not cfg.classifier.judge_model:
        raise UserError("classifier.kind=llm_judge needs classifier.judge_model (a local instruct model folder)")
    texts = dist.broadcast_object(texts)
    model, keep = load_probe_model(cfg, env, cfg.classifier.judge_model, zero3=zero3)
    tokenizer = load_tokenizer(_with_model(cfg, cfg.classifier.judge_model))
    judge = LlmJudgeClassifier(model, tokenizer, domains.names, batch_size=cfg.probe.batch_size)
    mine = dist.shard_sequence(texts, env.world_size, env.rank)
    num_batches = judge.forward_batches(math.ceil(len(texts) / env.world_size))
    probs = judge.predict_proba(mine, num_batches=num_batches)
    parts = dist.all_gather_objects(probs)
    del keep
    return np.concatenate(parts, axis=0) if env.is_main else None


def _with_model(cfg: RunConfig, path: str) -> RunConfig:
    import dataclasses

    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=path, tokenizer=None, gguf_file=None))


def write_distribution(probe_dir: Path, domains: Domains, estimate: Any, extra: dict) -> Path:
    path = probe_dir / DISTRIBUTION_FILE
    write_json_atomic(path, {
        "domains": list(domains.names), "p": list(estimate.p), "ci_low": list(estimate.ci_low),
        "ci_high": list(estimate.ci_high), "num_texts": estimate.num_texts, "estimator": estimate.mode,
        "confidence": estimate.confidence, **extra,
    })
    return path


def read_distribution(path: str | os.PathLike[str], domains: Domains) -> np.ndarray:
    """p by domain id from a distribution.json (mixture.distribution); its domains must be this run's."""
    file = Path(path)
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
        names, p = list(document["domains"]), [float(x) for x in document["p"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"mixture.distribution: cannot read a distribution from {file}: {exc}") from None
    if sorted(names) != sorted(domains.names) or len(p) != len(names):
        raise UserError(f"mixture.distribution: {file} has domains {names}, the run has {list(domains.names)}")
    return domains.array_from_mapping(dict(zip(names, p)), key=f"mixture.distribution ({file})")


def run_probe(cfg: RunConfig, env: DistEnv, *, run_dir: str | os.PathLike[str] | None = None,
              model: Any = None, tokenizer: Any = None) -> ProbeResult:
    """Generate, classify, estimate p; call on every rank after the process group is up.

    model / tokenizer: reuse an already loaded model (e.g. the training engine's module; under ZeRO-3
    pass the partitioned module and set probe.mode=zero3). Otherwise the model of cfg.model is loaded
    as probe.mode says. Returns p (and CI) on every rank; files go to <run_dir>/probe/.
    """
    from versatune_ds.classify import estimate_distribution
    from versatune_ds.data import load_tokenizer

    domains = Domains(cfg.domain_names)
    probe_dir = Path(run_dir if run_dir is not None else cfg.train.run_dir) / PROBE_DIR
    zero3 = cfg.probe.mode == "zero3"
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    keep = None
    if model is None:
        model, keep = load_probe_model(cfg, env, cfg.model.path, zero3=zero3)
    generations = generate_all(cfg, env, model, tokenizer, probe_dir, zero3=zero3)
    del model, keep
    texts = [g["text"] for g in generations] if env.is_main else None
    if cfg.classifier.kind == "llm_judge":
        probs = judge_probabilities(cfg, env, domains, texts, zero3=zero3)
    else:
        probs = train_probe_classifier(cfg, domains, probe_dir).predict_proba(texts) if env.is_main else None
    payload = None
    if env.is_main:
        assert probs is not None and texts is not None
        estimate = estimate_distribution(probs, mode=cfg.classifier.estimator, num_bootstrap=cfg.classifier.num_bootstrap, seed=cfg.train.seed)
        start = start_token(tokenizer)
        write_distribution(probe_dir, domains, estimate, {
            "start_token": start.text, "start_token_kind": start.kind, "classifier": cfg.classifier.kind,
            "model": cfg.model.path, "num_samples": cfg.probe.num_samples,
            "mean_generated_tokens": float(np.mean([g["num_tokens"] for g in generations])) if generations else 0.0,
            "empty_generations": sum(1 for t in texts if not t.strip()),
        })
        payload = np.concatenate([estimate.p, estimate.ci_low, estimate.ci_high, [estimate.num_texts]])
    n = len(domains)
    values = dist.broadcast_array(payload, 3 * n + 1)
    return ProbeResult(values[:n], values[n : 2 * n], values[2 * n : 3 * n], int(values[-1]), probe_dir / DISTRIBUTION_FILE)


def distribution_table(domains: Domains, result: ProbeResult) -> Any:
    from rich.table import Table

    table = Table(title=f"knowledge distribution ({result.num_texts} generations)")
    for column in ("domain", "p", "95% CI"):
        table.add_column(column, justify="left" if column == "domain" else "right")
    for d, name in enumerate(domains.names):
        table.add_row(name, f"{result.p[d]:.3f}", f"[{result.ci_low[d]:.3f}, {result.ci_high[d]:.3f}]")
    return table


# ----------------------------------------------------------------------------------------------
# Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--run-dir", default=None, help="output folder (default: train.run_dir)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. probe.num_samples=64")


def run_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from versatune_ds.config import load_config

    cfg = load_config(args.config, args.overrides)
    env = dist.DistEnv.from_environ(default_port=cfg.dist.master_port)
    dist.init_distributed(env, backend=cfg.dist.backend, timeout_s=cfg.dist.timeout_s)
    try:
        result = run_probe(cfg, env, run_dir=args.run_dir)
        if env.is_main:
            Console().print(distribution_table(Domains(cfg.domain_names), result))
            logger.info("wrote %s", result.distribution_path)
        dist.barrier()
    finally:
        dist.destroy()
    return 0
