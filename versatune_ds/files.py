"""Atomic writes: every file and folder versatune_ds writes appears whole or not at all.

A write goes to a temporary name in the target's own folder (same file system, so the rename is atomic),
is flushed, and is then renamed over the target. A crash, a kill -9 or a full disk leaves either the old
file or the new one, never half of one; a failed write removes its temporary file and re-raises.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable


def _temporary_sibling(target: Path) -> Path:
    # pid + a random suffix: ranks and concurrent runs writing the same target never share a temp name.
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> Path:
    """Write `data` to `path` atomically (creating its folder); `fsync` also forces it to disk first."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(target)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_text_atomic(path: str | os.PathLike[str], text: str, *, fsync: bool = False) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


def write_json_atomic(path: str | os.PathLike[str], document: Any, *, indent: int | None = 2) -> Path:
    """Write `document` as JSON atomically. NaN/inf are refused (strict JSON); callers write them as null."""
    return write_text_atomic(path, json.dumps(document, indent=indent, allow_nan=False) + "\n")


def read_json_objects(path: str | os.PathLike[str]) -> list[dict]:
    """The JSON objects of a JSON-lines file a run appends to, in order; [] when it does not exist. A line that is
    not a JSON object (a torn last line after a crash, a foreign line) is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    objects = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            objects.append(record)
    return objects


def write_folder_atomic(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)`, then rename the finished folder to `path`, replacing an older one.

    The old folder is moved aside first and deleted only after the new one is in place, so at every
    moment one complete folder exists under `path` or its side name. A failing `write` leaves no
    temporary folder behind.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(target)
    try:
        tmp.mkdir()
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.{os.getpid()}.old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target
