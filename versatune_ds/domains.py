"""Domains: the one place where domain names become integer ids.

Everything inside versatune_ds (data, sampler, mixture math, evaluation) indexes domains by id
0..N-1 in the order of the config's `data.domains`. Names appear only at the edges: the config, logs,
metric keys and files. This module converts in both directions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from versatune_ds.errors import UserError


@dataclass(frozen=True)
class Domains:
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.names:
            raise UserError("no domains configured: list at least one under data.domains")
        if len(set(self.names)) != len(self.names):
            raise UserError(f"domain names must be unique, got {list(self.names)}")

    @classmethod
    def from_names(cls, names: Sequence[str]) -> Domains:
        return cls(tuple(names))

    def __len__(self) -> int:
        return len(self.names)

    def id_of(self, name: str, *, key: str = "domain") -> int:
        """The id of `name`; `key` says where the name came from, for the error message."""
        try:
            return self.names.index(name)
        except ValueError:
            raise UserError(f"{key}: unknown domain {name!r}; known domains: {', '.join(self.names)}") from None

    def name_of(self, domain_id: int) -> str:
        return self.names[domain_id]

    def array_from_mapping(self, values: Mapping[str, float], *, key: str) -> np.ndarray:
        """An id-indexed float array from a name->value mapping that must cover every domain."""
        unknown = [name for name in values if name not in self.names]
        if unknown:
            raise UserError(f"{key}: unknown domain(s) {', '.join(unknown)}; known domains: {', '.join(self.names)}")
        missing = [name for name in self.names if name not in values]
        if missing:
            raise UserError(f"{key}: missing value(s) for domain(s) {', '.join(missing)}")
        return np.array([float(values[name]) for name in self.names], dtype=np.float64)

    def mapping_from_array(self, values: Sequence[float] | np.ndarray) -> dict[str, float]:
        """The name->value mapping of an id-indexed array (for logs and JSON files)."""
        if len(values) != len(self.names):
            raise ValueError(f"expected {len(self.names)} values, one per domain, got {len(values)}")
        return {name: float(v) for name, v in zip(self.names, values)}
