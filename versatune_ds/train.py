"""`run_training`: the one orchestrator, readable top to bottom.

    config -> DeepSpeed config (batch check before any process group) -> resume checks (config, data)
    -> memory preflight -> process group -> config.yaml -> probe distribution -> weight policy -> sampler
    -> ZeRO model + engine -> (restore checkpoint) -> [eval at start] -> loop:
         next global batch (this rank's slice, split into accumulation micro-batches) -> train_step
         -> metrics / trace -> every eval.every: per-domain eval, policy.after_eval -> sampler.set_weights
         -> every checkpoint.every: checkpoint
         -> a stop signal or checkpoint.every_minutes: checkpoint (and, for a signal, exit 75)
    -> final eval + checkpoint -> export (final/) -> report/

Every rank runs this same code; collectives happen in the same order on every rank (DESIGN.md §4).
Decisions (new weights, skipping a non-finite step) are made collectively: the policy computes on
rank 0 and broadcasts, `train_step` agrees on skips with one summed flag.

Around the loop (`run_training`): rank 0 holds the run-directory lock (run_lock.py); stop signals set a flag the
ranks agree on inside the step's token all_reduce (preemption.py).

The loop talks to its three seams through `protocols` (TrainingEngine, WeightPolicy, Sampler);
`engine_factory` lets a test run the whole loop in one process with a fake engine.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from transformers import PreTrainedTokenizerBase

from versatune_ds import dist
from versatune_ds.config.identity import config_to_dict, config_to_yaml
from versatune_ds.config.schema import RunConfig
from versatune_ds.data.packing import Example, collate_flat, collate_rows
from versatune_ds.data.prepare import PreparedData, log_data_sources, prepare_data
from versatune_ds.data.tokenizer import load_tokenizer
from versatune_ds.domains import Domains
from versatune_ds.engine import checkpoint, resume_checks
from versatune_ds.engine.ds_config import build_ds_config
from versatune_ds.engine.document_attention import model_reads_documents, use_document_attention
from versatune_ds.engine.export import export_from_engine
from versatune_ds.engine.memory import preflight_warning
from versatune_ds.engine.models import check_position_limit, load_inference_model, load_model, zero_stage
from versatune_ds.engine.train_engine import TrainEngine
from versatune_ds.errors import UserError
from versatune_ds.eval.heldout import DomainLosses, evaluate_domain_losses, hf_forward, training_heldout_sets
from versatune_ds.files import write_text_atomic
from versatune_ds.log import JsonlWriter, MetricsLogger, TrainProgress, log_eval_line, truncate_jsonl
from versatune_ds.mixture.build import build_weight_policy, sampler_rows
from versatune_ds.mixture.composition import DISTRIBUTION_STRATEGIES
from versatune_ds.mixture.sampler import MixtureSampler, MixtureSchedule
from versatune_ds.preemption import NUM_FLAGS, StopControl, clear_stop_marker, write_stop_marker
from versatune_ds.probe.distribution import DISTRIBUTION_FILE, PROBE_DIR, read_distribution
from versatune_ds.protocols import Sampler, TrainingEngine, WeightPolicy
from versatune_ds.provenance import record_start
from versatune_ds.redaction import redact
from versatune_ds.report import build_report
from versatune_ds.run_lock import RunDirLock

logger = logging.getLogger(__name__)

EXIT_STOPPED_NONFINITE = 3

# (run config, final DeepSpeed config) -> the engine; called on every rank after the process group is up.
EngineFactory = Callable[[RunConfig, dict], TrainingEngine]


@dataclass(frozen=True)
class TrainSummary:
    run_dir: Path
    final_step: int
    skipped_steps: int
    stopped_on_nonfinite: bool
    export_dir: Path | None
    stopped_on_signal: str | None = None  # the signal's name: checkpointed and stopped (exit code 75), not finished


def deepspeed_engine(cfg: RunConfig, ds_config: dict) -> TrainingEngine:
    """The real engine: the model partitioned at load under ZeRO-3, a client AdamW, DeepSpeed around it."""
    model = load_model(cfg.model, ds_config=ds_config)
    if cfg.data.padding_free:
        use_document_attention(model)  # else (or where it cannot) the batches stay padded
    return TrainEngine(cfg.train, model, ds_config, total_steps=cfg.train.max_steps)


def run_training(
    cfg: RunConfig,
    *,
    resume: str = "auto",
    allow_config_change: bool = False,
    engine_factory: EngineFactory = deepspeed_engine,
    force_unlock: bool = False,
) -> TrainSummary:
    """Train as `cfg` says; call on every rank (torchrun, the deepspeed launcher, srun, or one process)."""
    # The stop-signal handlers and the run-directory lock live exactly as long as this call.
    lock = RunDirLock(cfg.train.run_dir, stale_after_s=cfg.train.lock_stale_after_s, force=force_unlock)
    stops = StopControl(cfg.train.stop_signals, cfg.checkpoint.every_minutes,
                        is_main=dist.DistEnv.from_environ(default_port=cfg.dist.master_port).is_main)
    stops.install()
    try:
        return _train(cfg, lock, stops, resume=resume, allow_config_change=allow_config_change, engine_factory=engine_factory)
    finally:
        stops.restore()
        lock.release()


def _train(
    cfg: RunConfig, lock: RunDirLock, stops: StopControl, *, resume: str, allow_config_change: bool, engine_factory: EngineFactory
) -> TrainSummary:
    env = dist.DistEnv.from_environ(default_port=cfg.dist.master_port)
    run_dir = Path(cfg.train.run_dir)

    # 1. Everything that can be wrong with the setup fails here, before a process group or a model.
    build_ds_config(cfg, env.world_size)  # the run config's own batch setup, checked first
    check_position_limit(cfg.model, cfg.data.seq_len)
    resume_from = checkpoint.resolve_resume(run_dir, resume)
    if resume == "none" and checkpoint.find_latest(run_dir) is not None:
        raise UserError(f"--resume none, but {run_dir} already holds checkpoints; use --resume auto to continue the run, "
                        "or choose a new train.run_dir")
    saved = checkpoint.read_state(resume_from) if resume_from is not None else None
    batch_cfg = cfg  # cfg with the accumulation steps that keep a checkpoint's global batch on this many ranks
    if saved is not None:
        resume_checks.check_config_unchanged(
            saved, cfg, allow_change=allow_config_change or cfg.checkpoint.allow_config_change, where=str(resume_from),
            world_size=env.world_size,
        )
        batch_cfg = resume_checks.keep_global_batch(saved, cfg, env.world_size, where=str(resume_from))
    ds_config = build_ds_config(batch_cfg, env.world_size)
    log_data_sources(cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer)  # needs no process group; every rank reads the same cache
    domains = data.domains
    if saved is not None:
        resume_checks.check_data_unchanged(
            saved, domains.names, [d.fingerprint for d in data.per_domain], where=str(resume_from)
        )
    preflight_warning(cfg, ds_config, env)

    # 2. Process group, resolved config.
    dist.start_process_group(env, backend=cfg.dist.backend, timeout_s=cfg.dist.timeout_s)
    lock.acquire(env)  # nothing is written into run_dir before this: a second run on it stops here
    if env.is_main:
        clear_stop_marker(run_dir)
        write_text_atomic(run_dir / "config.yaml", redact(config_to_yaml(cfg)))
        record_start(run_dir, resumed_from=resume_from, world_size=env.world_size)  # provenance.jsonl: who made each segment

    # 3. Mixture: the probed distribution, the weight policy, the sampler.
    distribution = initial_distribution(cfg, env, run_dir, domains, tokenizer)
    eval_sets = training_heldout_sets(cfg.eval, data, ds_config["train_batch_size"])
    policy = build_policy(cfg, env, run_dir, data, distribution, ds_config, eval_sets)
    unit, row_sizes = sampler_rows(data, cfg.mixture.unit)  # the sampler apportions tokens / examples exactly
    sampler = MixtureSampler(
        [len(d.train_rows) for d in data.per_domain],
        seed=cfg.train.seed,
        block_size=cfg.mixture.block_size,
        global_batch_size=ds_config["train_batch_size"],
        rank=env.rank,
        world_size=env.world_size,
        schedule=MixtureSchedule.constant(policy.initial_sampler_weights()),
        domain_names=domains.names,
        unit=unit,
        row_sizes=row_sizes,
    )

    # 4. The engine; restore a checkpoint.
    engine = engine_factory(cfg, ds_config)
    padding_free = cfg.data.padding_free and model_reads_documents(engine.module)  # the same model: every rank agrees
    logger.info("training batches: %s", "padding-free (rows end to end)" if padding_free else "padded rows")
    step = 0
    if resume_from is not None:
        saved = checkpoint.load_checkpoint(engine, resume_from, env)
        step = int(saved["step"])
        sampler.load_state_dict(saved["sampler"])
        policy.load_state_dict(saved["policy"])
        engine.skipped_steps = int(saved.get("skipped_steps", 0))
    trace_path = run_dir / "trace" / f"rank{env.rank}.jsonl"
    # Lines a killed run wrote after its checkpoint are replayed now (all lines, on a fresh start).
    keep_until = step if resume_from is not None else -1
    if env.is_main:
        truncate_jsonl(run_dir / "metrics.jsonl", keep_until)
    if cfg.train.trace_samples:
        truncate_jsonl(trace_path, keep_until)
        if env.is_main:  # ranks that a resume on fewer ranks left without an owner
            for stale in stale_traces(run_dir, env.world_size):
                truncate_jsonl(stale, keep_until)
    trace = JsonlWriter(trace_path) if cfg.train.trace_samples else None
    metrics = MetricsLogger(
        run_dir, is_main=env.is_main, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
        wandb_project=cfg.logging.wandb_project, wandb_run_name=cfg.logging.wandb_run_name,
        config=config_to_dict(cfg),
    )

    def evaluate_and_reweight(at_step: int) -> None:
        result = evaluate(engine, eval_sets, cfg.eval.micro_batch_size, data.pad_token_id, env)
        new_weights = policy.after_eval(at_step, result)
        if new_weights is not None:
            sampler.set_weights(new_weights)  # identical on every rank: the policy broadcast them
        metrics.log(at_step, {**loss_metrics(domains, result), **policy.metrics()})
        # One console / Slurm-log line per evaluation, each loss with its standard error.
        log_eval_line(at_step, domains.names, result.loss, policy.metrics(), stderrs=result.se)

    def save(at_step: int) -> None:
        state = {
            "sampler": sampler.state_dict(),  # holds the mixture schedule
            "policy": policy.state_dict(),
            "skipped_steps": engine.skipped_steps,
            "global_batch_size": ds_config["train_batch_size"],  # kept when resuming on another number of ranks
            "domain_names": list(domains.names),
            "data_fingerprints": [d.fingerprint for d in data.per_domain],
            **resume_checks.config_state(cfg),
        }
        checkpoint.save_checkpoint(engine, run_dir, step=at_step, state=state, keep_last=cfg.checkpoint.keep_last, env=env)
        stops.saved()

    # 5. The loop.
    if step == 0:
        if cfg.eval.at_start:
            evaluate_and_reweight(0)
        else:
            metrics.log(0, policy.metrics())
    progress = TrainProgress(total_steps=cfg.train.max_steps, start_step=step, log_every=cfg.train.log_every, is_main=env.is_main)
    stopped = False
    stop_signal: str | None = None
    last_eval = last_save = step
    try:
        while step < cfg.train.max_steps:
            started = time.perf_counter()
            ids, rows, micro_batches = next_micro_batches(sampler, data, cfg.train.micro_batch_size, ds_config["gradient_accumulation_steps"], flat=padding_free)
            result = engine.train_step(micro_batches)
            # One all_reduce per step: the per-domain token counts and the stop / wall-clock flags (preemption.py).
            summed = dist.all_reduce_sum(np.concatenate([
                np.bincount(ids[:, 0], weights=[r.num_tokens for r in rows], minlength=len(domains)), stops.local_flags()
            ]))
            domain_tokens, decision = summed[:-NUM_FLAGS], stops.decide(summed[-NUM_FLAGS:])
            elapsed = time.perf_counter() - started
            step += 1
            if trace is not None:
                trace.write({"step": step, "rows": [[int(d), int(i), list(r.example_indices)] for (d, i), r in zip(ids, rows)]})
            tokens_per_s = float(domain_tokens.sum()) / max(elapsed, 1e-9)
            record = {
                "train/loss": result.loss,
                "train/lr": result.lr,
                "train/tokens_per_s": tokens_per_s,
                "train/loss_tokens": result.loss_tokens,
                "train/skipped_steps": engine.skipped_steps,
            }
            if result.grad_norm is not None:
                record["train/grad_norm"] = result.grad_norm
            record.update({f"train/domain_tokens/{domains.name_of(d)}": float(n) for d, n in enumerate(domain_tokens)})
            metrics.log(step, record)
            progress.update(step, result.loss, tokens_per_s)
            if result.skipped:
                logger.warning("step %d: non-finite loss or gradient on some rank; optimizer step skipped", step)
                if cfg.train.on_nonfinite == "stop":
                    save(step)
                    last_save = step
                    stopped = True
                    break
            if step % cfg.eval.every == 0 or step == cfg.train.max_steps:
                evaluate_and_reweight(step)
                last_eval = step
            if step % cfg.checkpoint.every == 0 or step == cfg.train.max_steps:
                save(step)
                last_save = step
            # After the step's regular evaluation and checkpoint, so a resumed run continues exactly.
            if (decision.checkpoint or decision.stop) and last_save != step:
                save(step)
                last_save = step
            if decision.stop:
                stop_signal = stops.signal_name
                break
    finally:
        progress.close()
    halted = stopped or stop_signal is not None
    if not halted and last_eval != step:  # max_steps already reached when the run was started
        evaluate_and_reweight(step)
    if last_save != step and not halted:
        save(step)

    # 6. Export the final model, write the report.
    export_dir = None
    if cfg.export.at_end and not halted:
        export_dir = export_from_engine(engine, tokenizer, run_dir / "final", cfg=cfg, env=env)
    metrics.close()
    if trace is not None:
        trace.close()
    if stop_signal is not None:
        finish_stop(run_dir, step, stop_signal, lock, env)
    elif env.is_main:
        write_report(run_dir)
    if stopped:
        logger.error("stopped at step %d on a non-finite loss (train.on_nonfinite=stop); checkpoint saved", step)
    return TrainSummary(run_dir, step, engine.skipped_steps, stopped, export_dir, stopped_on_signal=stop_signal)


# ----------------------------------------------------------------------------------------------
# Pieces of the loop


def next_micro_batches(sampler: Sampler, data: PreparedData, micro: int, accum: int, *, flat: bool = False) -> tuple[np.ndarray, list, list]:
    """This rank's rows of the next global batch as (ids [rows, 2], rows, `accum` collated micro-batches), each
    padding-free with `flat` (`collate_flat`: its rows end to end), else padded (`collate_rows`)."""
    ids = sampler.next_batch()
    rows = [data.per_domain[d].train_rows[i] for d, i in ids]
    chunks = [rows[k * micro : (k + 1) * micro] for k in range(accum)]
    return ids, rows, [collate_flat(c) if flat else collate_rows(c, pad_token_id=data.pad_token_id, packed=data.packed) for c in chunks]


def finish_stop(run_dir: Path, step: int, signal_name: str, lock: RunDirLock, env: dist.DistEnv) -> None:
    """Rank 0 leaves the launchers' marker and frees run_dir; the barrier keeps every rank alive until it has."""
    if env.is_main:
        latest = checkpoint.find_latest(run_dir)
        write_stop_marker(run_dir, step=step, signal_name=signal_name, checkpoint=str(latest) if latest else None)
        lock.release()
        logger.warning("stopped at step %d on %s after checkpoint %s; run the same command again to continue -- exit code 75",
                       step, signal_name, latest)
    dist.barrier()


def stale_traces(run_dir: Path, world_size: int) -> list[Path]:
    """Trace files of ranks >= `world_size` (written before a resume on fewer ranks)."""
    found = []
    for path in (run_dir / "trace").glob("rank*.jsonl"):
        suffix = path.stem[len("rank"):]
        if suffix.isdigit() and int(suffix) >= world_size:
            found.append(path)
    return sorted(found)


def write_report(run_dir: Path) -> None:
    """Rank 0 writes report/ at the end; a failed plot must not turn a finished run into a failure."""
    try:
        logger.info("report: %s", build_report(run_dir))
    except Exception as exc:  # noqa: BLE001 - the model and checkpoints are already safe; say so and go on
        logger.warning("could not write the report (%s: %s); run `versatune-ds report --run-dir %s`", type(exc).__name__, exc, run_dir)


def evaluate(
    engine: TrainingEngine, heldout: list[list[Example]], micro_batch_size: int, pad_token_id: int, env: dist.DistEnv
) -> DomainLosses:
    """Per-domain held-out loss by domain id with its standard error and per-example losses, identical on every rank."""
    with engine.eval_mode():
        return evaluate_domain_losses(
            engine.forward_loss_sums, heldout, micro_batch_size=micro_batch_size, pad_token_id=pad_token_id, env=env
        )


def loss_metrics(domains: Domains, result: DomainLosses) -> dict[str, float]:
    """`eval/<domain>/loss` and `eval/<domain>/loss_se` (the standard error over the domain's examples)."""
    record = {}
    for d, (loss, se) in enumerate(zip(result.loss, result.se)):
        record[f"eval/{domains.name_of(d)}/loss"] = float(loss)
        record[f"eval/{domains.name_of(d)}/loss_se"] = float(se)
    return record


def initial_distribution(
    cfg: RunConfig, env: dist.DistEnv, run_dir: Path, domains: Domains, tokenizer: PreTrainedTokenizerBase
) -> np.ndarray | None:
    """The probed domain distribution p for strategies that start from it (else None).

    Order: mixture.distribution; <run_dir>/probe/distribution.json (an earlier probe or a resumed run);
    else run the probe now (every rank).
    """
    if cfg.mixture.strategy not in DISTRIBUTION_STRATEGIES:
        return None
    if cfg.mixture.distribution:
        return read_distribution(cfg.mixture.distribution, domains)
    if (existing := run_dir / PROBE_DIR / DISTRIBUTION_FILE).is_file():
        logger.info("using the probed distribution in %s", existing)
        return read_distribution(existing, domains)
    logger.info("probing the base model's domain distribution (%d samples)", cfg.probe.num_samples)
    from versatune_ds.probe.pipeline import run_probe  # here: its scikit-learn stack slows every rank's start-up
    return run_probe(cfg, env, run_dir=run_dir, tokenizer=tokenizer).p


def build_policy(
    cfg: RunConfig, env: dist.DistEnv, run_dir: Path, data: PreparedData, distribution: np.ndarray | None, ds_config: dict,
    eval_sets: list[list[Example]],
) -> WeightPolicy:
    """The weight policy (mixture.policy); a reference model is evaluated like the model being trained, on the same examples."""

    def evaluate_model(model_path: str) -> DomainLosses:
        zero3 = zero_stage(ds_config) == 3
        offload = ds_config.get("zero_optimization", {}).get("offload_param") if zero3 else None
        reference = load_inference_model(cfg.model.for_folder(model_path), env, zero3=zero3, offload_param=offload)
        result = evaluate_domain_losses(
            hf_forward(reference.module, reference.device), eval_sets,
            micro_batch_size=cfg.eval.micro_batch_size, pad_token_id=data.pad_token_id, env=env,
        )
        del reference
        return result

    return build_weight_policy(
        cfg.mixture, data.domains, data, run_dir, env, initial_distribution=distribution, evaluate_model=evaluate_model,
        example_ids=[[e.index for e in examples] for examples in eval_sets],
    )
