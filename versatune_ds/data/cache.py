"""The tokenization cache: a domain's tokenized training and held-out examples as one .npz file.

The file name is a hash of everything that changes the tokens (file contents, tokenizer, template, data
settings; see data.prepare), so a second run with the same inputs skips tokenization.

- Written atomically (a temporary name, fsync, rename): readers see no file or a whole one, also when the
  writer is killed mid-write.
- Read defensively: a file that cannot be read, or whose arrays do not fit together (truncated, garbage, another
  version), is reported and ignored, and the caller tokenizes again and replaces it - a damaged cache never
  stops a run.
- Built once per cache folder: `cache_lock` is an exclusive file lock (flock) around "read, else tokenize and
  write", so the ranks of a node that start together wait for the first one instead of all tokenizing; a rank
  that dies releases its lock with its process. Waiting has a timeout with a clear message.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from versatune_ds.data.packing import IGNORE_INDEX, Example
from versatune_ds.errors import UserError
from versatune_ds.files import write_bytes_atomic

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the cached content or its meaning changes (2: formats rewrite, per-turn loss, notes)
LOCK_POLL_S = 0.2


@dataclass(frozen=True)
class Tokenized:
    """Examples of one split as flat arrays (the cached form)."""

    input_ids: np.ndarray  # int64 [total tokens]
    labels: np.ndarray  # int64 [total tokens]
    lengths: np.ndarray  # int64 [examples]

    def examples(self, domain_id: int) -> list[Example]:
        ends = np.cumsum(self.lengths)
        starts = ends - self.lengths
        return [
            Example(index, domain_id, self.input_ids[s:e], self.labels[s:e])
            for index, (s, e) in enumerate(zip(starts.tolist(), ends.tolist()))
        ]


_ARRAYS = ("input_ids", "labels", "lengths")  # the fields of Tokenized, as stored in the cache file


def write_cache(path: Path, train: Tokenized, heldout: Tokenized, meta: dict[str, Any]) -> None:
    """Write atomically (a unique temporary name, fsync, rename): readers see either no file or a whole one."""
    buffer = io.BytesIO()
    arrays = {
        f"{split}_{name}": getattr(t, name).astype(np.int32)
        for split, t in (("train", train), ("heldout", heldout))
        for name in _ARRAYS
    }
    np.savez(buffer, meta=np.array(json.dumps({"version": CACHE_VERSION, **meta})), **arrays)
    write_bytes_atomic(path, buffer.getvalue(), fsync=True)


def read_cache(path: Path) -> tuple[Tokenized, Tokenized, dict[str, Any]] | None:
    """(train, held-out, meta) from a cache file, or None when there is none or it is unusable (then logged)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION:
                return None  # another version's file under the same name: tokenize again and replace it
            splits = [Tokenized(*(data[f"{split}_{name}"].astype(np.int64) for name in _ARRAYS)) for split in ("train", "heldout")]
        for split in splits:
            _check(split)
    except Exception as exc:  # a damaged file fails in many ways: BadZipFile, EOFError, zlib.error, ValueError, ...
        logger.warning("the data cache file %s is damaged or unreadable (%s: %s); tokenizing again and replacing it",
                       path, type(exc).__name__, exc)
        return None
    return splits[0], splits[1], meta


def _check(split: Tokenized) -> None:
    """The arrays of a split fit together (a file cut short or edited can still unzip)."""
    ids, labels, lengths = split.input_ids, split.labels, split.lengths
    if ids.ndim != 1 or labels.shape != ids.shape or lengths.ndim != 1:
        raise ValueError("array shapes do not match")
    if (lengths <= 0).any() or int(lengths.sum()) != ids.size:
        raise ValueError("example lengths do not add up to the token count")
    if ((labels != IGNORE_INDEX) & (labels != ids)).any():
        raise ValueError("labels differ from the token ids")


@contextlib.contextmanager
def cache_lock(path: Path, timeout_s: float, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `<path>.lock` (see the module docstring); `what` names the work in messages."""
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _acquire(fd, lock_path, timeout_s, what):
            yield  # a file system without locks: every process tokenizes for itself (atomic writes keep it safe)
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, lock_path: Path, timeout_s: float, what: str) -> bool:
    started = time.monotonic()
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        except OSError as exc:  # e.g. ENOLCK on a network file system without lock support
            logger.debug("cannot lock %s (%s); tokenizing without a lock", lock_path, exc)
            return False
        waited = time.monotonic() - started
        if not told:
            logger.info("%s: another process is tokenizing it (%s); waiting for its cache file", what, _holder(lock_path))
            told = True
        if waited > timeout_s:
            raise UserError(
                f"{what}: waited {waited:.0f} s (data.lock_timeout_s={timeout_s:g}) for another process to tokenize it "
                f"({_holder(lock_path)}, lock file {lock_path}); raise data.lock_timeout_s for very large data, or "
                "stop the other process if it hangs"
            )
        time.sleep(LOCK_POLL_S)


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return f"held by {text}" if text else "holder unknown"
