"""Checkpoints: DeepSpeed state + our resumable state, written atomically, rotated, checked on resume.

Layout under `<run_dir>/checkpoints/`:

    step_00000100/            DeepSpeed's files (model, optimizer and LR-schedule shards of every rank)
        rng_rank<r>.json      each rank's RNG states (python, numpy, torch, cuda), JSON
        versatune_state.json  our state (step, sampler, schedule, policy, config + hash, data fingerprints);
                              written by rank 0 after every rank has saved: its presence = complete
    latest                    the tag of the newest complete checkpoint, replaced via temp + rename

Order of a save (all ranks): rank 0 clears a stale half-written folder of the same tag -> barrier ->
DeepSpeed save + RNG file on every rank -> barrier -> rank 0 writes versatune_state.json, then
`latest`, then deletes checkpoints beyond `keep_last` (older ones only, so a newer complete checkpoint
always exists before an older one goes) -> barrier. A kill at any point leaves the previous `latest`
valid. `find_latest` also falls back to the newest complete folder when `latest` is missing or stale.

Resume checks, before any model is loaded: a changed config (keys that change results, see
config.HASH_EXCLUDED_KEYS) is refused listing the changed keys unless allowed; a changed data set is
refused naming the domain.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from versatune_ds import dist
from versatune_ds.config import HASH_EXCLUDED_KEYS, config_diff, config_hash, config_to_dict
from versatune_ds.errors import UserError

if TYPE_CHECKING:
    from versatune_ds.config import RunConfig
    from versatune_ds.engine import TrainEngine

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "versatune_state.json"
STATE_VERSION = 1
_TAG = re.compile(r"^step_(\d+)$")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_root(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# RNG state (JSON-safe)


def capture_rng_state() -> dict:
    import torch

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
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))

    def decode(text: str) -> Any:
        return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())

    torch.set_rng_state(decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(decode(state["cuda"]))


# ----------------------------------------------------------------------------------------------
# Save, rotate, find


def save_checkpoint(
    engine: TrainEngine, run_dir: str | os.PathLike[str], *, step: int, state: Mapping[str, Any], keep_last: int, env: dist.DistEnv
) -> Path:
    """Save a complete checkpoint for `step` (call on ALL ranks); returns its folder."""
    root = checkpoints_root(run_dir)
    tag = tag_for_step(step)
    folder = root / tag
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if folder.exists():  # a half-written save of this step from a killed run
            shutil.rmtree(folder)
    dist.barrier()
    engine.save(str(root), tag, client_state={"versatune_step": step})
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / f"rng_rank{env.rank}.json", json.dumps(capture_rng_state()))
    dist.barrier()
    if env.is_main:
        document = {"version": STATE_VERSION, "step": step, "tag": tag, "world_size": env.world_size, **state}
        write_text_atomic(folder / STATE_FILE, json.dumps(document, indent=1))
        write_text_atomic(root / LATEST_FILE, tag + "\n")
        _rotate(root, keep_last, newest=step)
    dist.barrier()
    logger.info("saved checkpoint %s", folder)
    return folder


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
    """Delete complete checkpoints beyond the newest `keep_last`, and incomplete ones older than `newest`."""
    complete = _complete_tags(root)
    doomed = [path for step, path in complete[:-keep_last] if step < newest]
    done = {path for _, path in complete}
    doomed += [p for p in root.iterdir() if p not in done and (_tag_step(p) or newest) < newest]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def find_latest(run_dir_or_root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint folder of a run dir (or of its checkpoints/ folder), or None."""
    root = Path(run_dir_or_root)
    if root.name != CHECKPOINT_DIR and (root / CHECKPOINT_DIR).is_dir():
        root = root / CHECKPOINT_DIR
    latest = root / LATEST_FILE
    if latest.is_file():
        folder = root / latest.read_text(encoding="utf-8").strip()
        if (folder / STATE_FILE).is_file():
            complete = _complete_tags(root)
            # `latest` is written after the state file, so a newer complete folder means a kill in between.
            return complete[-1][1] if complete and complete[-1][0] > (_tag_step(folder) or -1) else folder
    complete = _complete_tags(root)
    return complete[-1][1] if complete else None


def resolve_resume(run_dir: str | os.PathLike[str], resume: str) -> Path | None:
    """`--resume none|auto|<path>` -> the checkpoint folder to resume from (None: fresh start)."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(run_dir)
    path = Path(resume).expanduser()
    if (path / STATE_FILE).is_file():
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


def load_checkpoint(engine: TrainEngine, folder: str | os.PathLike[str], env: dist.DistEnv) -> dict:
    """Restore DeepSpeed state and this rank's RNG from `folder` (ALL ranks); returns our state dict."""
    folder = Path(folder)
    state = read_state(folder)
    if int(state.get("world_size", env.world_size)) != env.world_size:
        raise UserError(
            f"checkpoint {folder} was written by {state['world_size']} ranks, this run has {env.world_size}; "
            "resume with the same number of ranks (or export it and start a new run from the exported model)"
        )
    client = engine.load(str(folder.parent), folder.name)
    if client.get("versatune_step", state["step"]) != state["step"]:
        raise UserError(f"checkpoint {folder} is inconsistent: DeepSpeed state is for step {client.get('versatune_step')}")
    rng_file = folder / f"rng_rank{env.rank}.json"
    restore_rng_state(json.loads(rng_file.read_text(encoding="utf-8")))
    logger.info("resumed from %s (step %d)", folder, state["step"])
    return state


# ----------------------------------------------------------------------------------------------
# Resume checks


def _prune(tree: dict, excluded: Sequence[str] = HASH_EXCLUDED_KEYS) -> dict:
    tree = json.loads(json.dumps(tree))
    for dotted in excluded:
        node = tree
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.get(part, {})
        node.pop(parts[-1], None)
    return tree


def config_state(cfg: RunConfig) -> dict:
    """What a checkpoint records about the config."""
    return {"config_hash": config_hash(cfg), "config": config_to_dict(cfg)}


def check_config_unchanged(state: Mapping[str, Any], cfg: RunConfig, *, allow_change: bool, where: str) -> list[str]:
    """Refuse a resume whose config changes results; returns the changed keys (empty when unchanged)."""
    if state.get("config_hash") == config_hash(cfg):
        return []
    changed = config_diff(_prune(state.get("config", {})), _prune(config_to_dict(cfg)))
    if not changed:
        return []
    if allow_change:
        logger.warning("resuming %s with a changed config (allowed): %s", where, "; ".join(changed))
        return changed
    raise UserError(
        f"the config differs from the one checkpoint {where} was made with:\n  "
        + "\n  ".join(changed)
        + "\nresume with the original config, start a new run_dir, or pass --allow-config-change "
        "(checkpoint.allow_config_change=true) to continue anyway"
    )


def check_data_unchanged(state: Mapping[str, Any], names: Sequence[str], fingerprints: Sequence[str], *, where: str) -> None:
    """Refuse a resume whose training data changed, naming the domain(s)."""
    old = dict(zip(state.get("domain_names", []), state.get("data_fingerprints", [])))
    changed = [name for name, fp in zip(names, fingerprints) if name in old and old[name] != fp]
    added = [name for name in names if name not in old]
    removed = [name for name in old if name not in names]
    problems = [f"domain {n!r}: its data changed" for n in changed]
    problems += [f"domain {n!r} is new" for n in added] + [f"domain {n!r} was removed" for n in removed]
    if problems:
        raise UserError(
            f"the training data differs from checkpoint {where}: " + "; ".join(problems)
            + ". Restore the original data files (and tokenizer / data settings), or start a new run_dir"
        )
