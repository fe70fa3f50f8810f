"""Saved classifier state: a JSON metadata file + an npz of arrays, never pickle.

Every saved classifier has a `format` name and a `version` in its JSON; loading checks both and the domain
names (ids are positions, so a reordered list would silently relabel), and reads arrays with
`allow_pickle=False`, so a classifier from an untrusted place cannot run code.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from versatune_ds.errors import UserError
from versatune_ds.files import write_bytes_atomic, write_json_atomic


def write_state(directory: Path, meta_name: str, meta: Mapping[str, Any], arrays_name: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Arrays first, metadata last (each written atomically): a folder with the metadata file is complete."""
    buffer = io.BytesIO()
    np.savez(buffer, **dict(arrays))  # type: ignore[arg-type]  # numpy's stub types the first keyword
    write_bytes_atomic(directory / arrays_name, buffer.getvalue())
    write_json_atomic(directory / meta_name, dict(meta))


def read_meta(path: Path, expected_format: str, version: int, domain_names: Sequence[str] | None) -> dict[str, Any]:
    """The metadata at `path`, checked: format name, version, and (when given) the domain names in order."""
    if not path.is_file():
        raise UserError(f"no saved classifier at {path.parent}: expected {path.name} there; train one first "
                        "(`versatune-ds classify` or `versatune-ds probe` does) or fix the path")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: unreadable classifier metadata ({error}); retrain the classifier") from None
    found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else (None, None)
    if found != (expected_format, version):
        raise UserError(f"{path}: a classifier of format {found[0]!r} version {found[1]!r}, expected {expected_format!r} "
                        f"version {version}; retrain the classifier with this version of versatune-ds")
    names = meta.get("domain_names")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise UserError(f"{path}: `domain_names` must be a list of names; the classifier is damaged -- retrain it")
    if domain_names is not None and list(domain_names) != names:
        raise UserError(f"{path}: the classifier was trained for domains {names} (in this order), but the run uses "
                        f"{list(domain_names)}; retrain it for these domains or list the domains in the classifier's order")
    return meta


def read_arrays(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays `names` of an npz file, read without pickle; a missing or damaged file is a clear error."""
    if not path.is_file():
        raise UserError(f"{path}: missing (the classifier's arrays); the classifier is incomplete -- retrain it")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [name for name in names if name not in arrays.files]
            if missing:
                raise UserError(f"{path}: lacks arrays {missing}; the classifier is damaged -- retrain it")
            return {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise UserError(f"{path}: cannot read the classifier's arrays ({error}); retrain it") from None
