"""The tokenization cache: a domain's tokenized training and held-out examples as one .npz file.

The file name is a hash of everything that changes the tokens (file contents, tokenizer, template, data
settings; see data.prepare), so a second run with the same inputs skips tokenization. Files are written
atomically; an unreadable one is reported and ignored (the caller tokenizes again).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from versatune_ds.data.packing import Example
from versatune_ds.files import write_bytes_atomic

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the cached content or its meaning changes


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


def write_cache(path: Path, train: Tokenized, heldout: Tokenized, skipped: dict[str, int]) -> None:
    """Write atomically (a unique temporary name, fsync, rename): readers see either no file or a whole one."""
    buffer = io.BytesIO()
    arrays = {
        f"{split}_{name}": getattr(t, name).astype(np.int32)
        for split, t in (("train", train), ("heldout", heldout))
        for name in _ARRAYS
    }
    np.savez(buffer, meta=np.array(json.dumps({"version": CACHE_VERSION, "skipped": skipped})), **arrays)
    write_bytes_atomic(path, buffer.getvalue(), fsync=True)


def read_cache(path: Path) -> tuple[Tokenized, Tokenized, dict[str, int]] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            splits = [Tokenized(*(data[f"{split}_{name}"].astype(np.int64) for name in _ARRAYS)) for split in ("train", "heldout")]
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("ignoring the unreadable data cache file %s (%s); tokenizing again", path, exc)
        return None
    if meta.get("version") != CACHE_VERSION:
        return None
    return splits[0], splits[1], meta["skipped"]
