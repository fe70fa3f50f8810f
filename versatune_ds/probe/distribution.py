"""The probe's output file, `<run_dir>/probe/distribution.json`, and its reader (`mixture.distribution`).

A module of its own, light on imports, because every rank of `train` reads the file while only a run that probes
needs the probe pipeline and its scikit-learn / scipy stack (about 2 s of start-up per process).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from versatune_ds.domains import Domains
from versatune_ds.errors import UserError

PROBE_DIR = "probe"
DISTRIBUTION_FILE = "distribution.json"


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
