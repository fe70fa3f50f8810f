"""Checkpoints: DeepSpeed state + our resumable state, written atomically, rotated, checked on resume.

Layout under `<run_dir>/checkpoints/`:

    step_00000100/            DeepSpeed's files (model, optimizer and LR-schedule shards of every rank)
        rng_rank<r>.json      each rank's RNG states (python, numpy, torch, cuda), JSON
        versatune_state.json  our state (step, sampler, schedule, policy, config + hash, data fingerprints,
                              and the size of every file above); written by rank 0 after every rank has
                              saved: its presence = complete
    latest                    the tag of the newest complete checkpoint, replaced via temp + rename

Our own state is JSON, never pickle. DeepSpeed's files are torch pickles that DeepSpeed 0.19 loads with
`torch.load(weights_only=False)` (any object, i.e. any code); `zero.weights_only_loading()` makes every
`torch.load` inside DeepSpeed's loading run with `weights_only=True`, allowing only the few DeepSpeed
types its files hold, so a doctored checkpoint is refused instead of executed.

Order of a save (all ranks): rank 0 clears a stale half-written folder of the same tag -> barrier ->
DeepSpeed save + RNG file on every rank -> barrier -> rank 0 writes versatune_state.json, then
`latest`, then deletes checkpoints beyond `keep_last` (older ones only, so a newer complete checkpoint
always exists before an older one goes) -> barrier. A kill at any point leaves the previous `latest`
valid. A write that fails on any rank (disk full, quota, I/O error) is caught, the ranks agree on it,
the half-written folder is removed and every rank raises one clear error naming the file; `latest` and
the older checkpoints are untouched.

`find_latest` returns the newest complete checkpoint whose files are all there with the sizes recorded
at save time: a folder without the state file (killed while saving), a truncated or missing shard,
or a missing / dangling `latest` is reported by name and the previous complete checkpoint is used.

What a resume may change is checked before any model is loaded, in `engine.resume_checks`. A checkpoint is
not tied to the number of ranks that wrote it: `TrainEngine.load` redistributes ZeRO-3 shards written by another
number of ranks (`engine.reshard`), and a rank the saving run did not have starts from a seeded RNG (the RNG
only drives dropout; the sample order does not use it).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as torch_dist

from versatune_ds import dist
from versatune_ds.engine.zero import weights_only_loading
from versatune_ds.errors import UserError
from versatune_ds.files import write_text_atomic
from versatune_ds.protocols import TrainingEngine

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "versatune_state.json"
STATE_VERSION = 1
_TAG = re.compile(r"^step_(\d+)$")
_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)[_.]")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_root(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


# ----------------------------------------------------------------------------------------------
# RNG state (JSON-safe)


def capture_rng_state() -> dict:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode("ascii")
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))

    def decode(text: str) -> Any:
        return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())

    torch.set_rng_state(decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(decode(state["cuda"]))


def seed_rng(seed: int) -> None:
    """Seed python, numpy and torch (and CUDA) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Save, rotate, find


def save_checkpoint(
    engine: TrainingEngine, run_dir: str | os.PathLike[str], *, step: int, state: Mapping[str, Any], keep_last: int, env: dist.DistEnv
) -> Path:
    """Save a complete checkpoint for `step` (call on ALL ranks); returns its folder.

    A failed write on any rank raises `UserError` on every rank, after the half-written folder is gone.
    """
    root = checkpoints_root(run_dir)
    tag = tag_for_step(step)
    folder = root / tag
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if folder.exists():  # a half-written save of this step from a killed run
            shutil.rmtree(folder)
    with _peer_failures_as_collective_errors(folder):
        dist.barrier()
    failure: str | None = None
    files: dict[str, int] = {}
    with _recording_write_errors(engine) as write_errors:
        try:
            engine.save(str(root), tag, client_state={"versatune_step": step})
            folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(folder / f"rng_rank{env.rank}.json", json.dumps(capture_rng_state()))
            files = _own_file_sizes(folder, env.rank)
        except (OSError, RuntimeError) as exc:  # DeepSpeed writes outside its checkpoint engine, our RNG file
            if _is_peer_failure(exc):  # DeepSpeed's own collectives inside the save: another rank died or hangs
                raise _collective_error(folder, exc) from exc
            write_errors.append(f"{folder}: {type(exc).__name__}: {exc}")
    failure = write_errors[0] if write_errors else None
    # Every rank learns whether any rank failed, so all stop together (no rank waits in a later collective).
    with _peer_failures_as_collective_errors(folder):
        reports = dist.all_gather_objects((failure, files))
    failures = [(rank, text) for rank, (text, _) in enumerate(reports) if text is not None]
    if failures:
        if env.is_main:
            shutil.rmtree(folder, ignore_errors=True)  # incomplete: never resumable, frees the space it took
        with _peer_failures_as_collective_errors(folder):
            dist.barrier()
        raise UserError(_save_failure_message(folder, failures, find_latest(root)))
    if env.is_main:
        all_files = {name: size for _, sizes in reports for name, size in sizes.items()}
        document = {"version": STATE_VERSION, "step": step, "tag": tag, "world_size": env.world_size, **state, "files": all_files}
        write_text_atomic(folder / STATE_FILE, json.dumps(document, indent=1))
        write_text_atomic(root / LATEST_FILE, tag + "\n")
        _rotate(root, keep_last, newest=step)
    with _peer_failures_as_collective_errors(folder):
        dist.barrier()
    logger.info("saved checkpoint %s", folder)
    return folder


# What gloo and the c10d store say when a peer died or stopped answering inside a collective; "Application timeout
# caused pair closure" (a timed-out gloo pair) carries none of the words dist.is_collective_failure looks for.
_PEER_FAILURE_WORDS = ("pair closure", "timeout", "Timeout", "timed out", "Timed out", "Connection", "connection")


def _is_peer_failure(exc: BaseException) -> bool:
    return dist.is_collective_failure(exc) or (isinstance(exc, RuntimeError) and any(w in str(exc) for w in _PEER_FAILURE_WORDS))


def _collective_error(folder: Path, exc: BaseException) -> torch_dist.DistError:
    """A collective failure inside a save, as the error type `dist.is_collective_failure` knows (the `train` command
    turns it into the lost-rank message)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return torch_dist.DistNetworkError(f"while saving checkpoint {folder}: {first}")


@contextmanager
def _peer_failures_as_collective_errors(folder: Path) -> Iterator[None]:
    """Around our own collectives in a save: any RuntimeError there means a peer is gone."""
    try:
        yield
    except torch_dist.DistError:
        raise
    except RuntimeError as exc:
        raise _collective_error(folder, exc) from exc


@contextmanager
def _recording_write_errors(engine: Any) -> Iterator[list[str]]:
    """Make DeepSpeed's per-file writes record an error instead of raising it.

    DeepSpeed's save has collectives after the writes (a final barrier): a rank that raised out of a
    write would leave the others waiting there until the timeout. Recording lets every rank reach the
    same collectives and then agree on the failure. A partly written file is removed at once.
    """
    errors: list[str] = []
    checkpoint_engine = getattr(getattr(engine, "engine", None), "checkpoint_engine", None)
    if checkpoint_engine is None or not hasattr(checkpoint_engine, "save"):
        yield errors
        return
    original = checkpoint_engine.save

    def save(state_dict: Any, path: str) -> Any:
        try:
            return original(state_dict, path)
        except (OSError, RuntimeError) as exc:
            errors.append(f"{path}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}")
            Path(path).unlink(missing_ok=True)
            return None

    checkpoint_engine.save = save  # an instance attribute: only this engine, only during this save
    try:
        yield errors
    finally:
        del checkpoint_engine.save


def _save_failure_message(folder: Path, failures: list[tuple[int, str]], previous: Path | None) -> str:
    try:
        free = f"{shutil.disk_usage(folder.parent).free / 2**20:.1f} MiB free there now"
    except OSError:
        free = "free space unknown"
    where = "; ".join(f"rank {rank}: {text}" for rank, text in failures)
    kept = (
        f"the previous checkpoint {previous} is intact and `--resume auto` continues from it"
        if previous is not None else "there is no earlier complete checkpoint"
    )
    return (
        f"could not write checkpoint {folder} ({where}); {free}. The incomplete folder was removed and {kept}. "
        "Free space (or lower checkpoint.keep_last, or point train.run_dir at a larger disk) and run again"
    )


def _own_file_sizes(folder: Path, rank: int) -> dict[str, int]:
    """Sizes of the files in `folder` this rank wrote (rank r: zero_pp_rank_r_*, rng_rank<r>; rank 0: the rest).

    Each rank reports its own files so a shared file system that is slow to show other nodes' files
    cannot record a wrong size.
    """
    sizes = {}
    for path in folder.iterdir():
        if not path.is_file() or path.name.startswith("."):
            continue
        match = _RANK_FILE.search(path.name)
        owner = int(match.group(1)) if match else 0
        if owner == rank:
            sizes[path.name] = path.stat().st_size
    return sizes


def damage(folder: str | os.PathLike[str]) -> str | None:
    """Why a complete-looking checkpoint folder cannot be used (None: its recorded files are all intact)."""
    folder = Path(folder)
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{folder / STATE_FILE} is unreadable ({exc})"
    recorded = state.get("files") if isinstance(state, dict) else None
    for name, size in sorted((recorded or {}).items()):  # checkpoints written before sizes were recorded: no check
        path = folder / name
        try:
            actual = path.stat().st_size
        except OSError:
            return f"{path} is missing"
        if actual != size:
            return f"{path} has {actual} bytes, {size} were written (truncated or overwritten)"
    return None


def _tag_step(path: Path) -> int | None:
    match = _TAG.match(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def _complete_tags(root: Path) -> list[tuple[int, Path]]:
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        step = _tag_step(path)
        if step is not None and (path / STATE_FILE).is_file():
            found.append((step, path))
    return sorted(found)


def _rotate(root: Path, keep_last: int, *, newest: int) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, incomplete ones older than `newest`, and
    checkpoints newer than `newest` (left by a run that was resumed from an earlier checkpoint: an abandoned
    future that `--resume auto` must not pick up again). `newest` is complete when this runs."""
    complete = [(step, path) for step, path in _complete_tags(root) if step <= newest]
    doomed = [path for step, path in complete[:-keep_last] if step < newest]
    done = {path for _, path in complete}
    doomed += [p for p in root.iterdir() if p not in done and _tag_step(p) is not None and _tag_step(p) != newest]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def find_latest(run_dir_or_root: str | os.PathLike[str]) -> Path | None:
    """The newest complete, intact checkpoint folder of a run dir (or of its checkpoints/ folder), or None.

    Normally the one `latest` names. A newer complete folder wins (a kill between its state file and
    `latest`); a damaged one (see `damage`) or a missing / dangling `latest` is logged by name and the
    previous complete checkpoint is used.
    """
    root = Path(run_dir_or_root)
    if root.name != CHECKPOINT_DIR and (root / CHECKPOINT_DIR).is_dir():
        root = root / CHECKPOINT_DIR
    complete = _complete_tags(root)
    if not complete:
        return None
    latest = root / LATEST_FILE
    pointer = latest.read_text(encoding="utf-8").strip() if latest.is_file() else None
    if pointer is None:
        logger.warning("%s is missing; looking for the newest complete checkpoint in %s", latest, root)
    elif not (root / pointer / STATE_FILE).is_file():
        logger.warning("%s names %r, which is not a complete checkpoint; looking for the newest complete one", latest, pointer)
    for _, folder in reversed(complete):
        problem = damage(folder)
        if problem is None:
            return folder
        logger.warning("checkpoint %s is damaged: %s; using the previous complete checkpoint", folder, problem)
    logger.warning("no intact checkpoint in %s", root)
    return None


def resolve_resume(run_dir: str | os.PathLike[str], resume: str) -> Path | None:
    """`--resume none|auto|<path>` -> the checkpoint folder to resume from (None: fresh start)."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(run_dir)
    path = Path(resume).expanduser()
    if (path / STATE_FILE).is_file():
        problem = damage(path)
        if problem is not None:
            raise UserError(f"--resume {resume}: the checkpoint is damaged: {problem}; give another checkpoint or 'auto'")
        return path
    found = find_latest(path) if path.is_dir() else None
    if found is None:
        raise UserError(
            f"--resume {resume}: no complete checkpoint there (a checkpoint folder holds {STATE_FILE}); "
            "give a checkpoint folder, a run dir, 'auto' or 'none'"
        )
    return found


def read_state(folder: str | os.PathLike[str]) -> dict:
    path = Path(folder) / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read checkpoint state {path}: {exc}") from None


def load_checkpoint(engine: TrainingEngine, folder: str | os.PathLike[str], env: dist.DistEnv) -> dict:
    """Restore DeepSpeed state and this rank's RNG from `folder` (ALL ranks); returns our state dict."""
    folder = Path(folder)
    state = read_state(folder)
    try:
        with weights_only_loading():
            client = engine.load(str(folder.parent), folder.name)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 -- unreadable files surface as OSError, RuntimeError, EOFError, UnpicklingError
        if dist.is_collective_failure(exc):
            raise
        raise UserError(
            f"could not load checkpoint {folder}: {type(exc).__name__}: {_first_line(exc)}; resume from an earlier "
            "checkpoint (--resume <run_dir>/checkpoints/step_N) or start a new train.run_dir"
        ) from None
    if client.get("versatune_step", state["step"]) != state["step"]:
        raise UserError(f"checkpoint {folder} is inconsistent: DeepSpeed state is for step {client.get('versatune_step')}")
    rng_file = folder / f"rng_rank{env.rank}.json"
    if env.rank < int(state.get("world_size", env.world_size)):
        restore_rng_state(json.loads(rng_file.read_text(encoding="utf-8")))
    else:  # a rank the saving run did not have (resumed on more ranks): a fresh, reproducible seed
        seed_rng(int(state["step"]) * 1_000_003 + env.rank)
        logger.info("rank %d has no RNG state in %s (written by %s ranks): seeded from the step and the rank",
                    env.rank, folder, state.get("world_size"))
    logger.info("resumed from %s (step %d)", folder, state["step"])
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
