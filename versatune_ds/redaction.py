"""Secrets never reach the run directory or the logs: the one filter for every text versatune_ds writes.

A secret is the value of an environment variable whose name looks like one (`SECRET_NAME`: ...TOKEN...,
...SECRET..., ...PASSWORD..., ...KEY..., ...CREDENTIAL..., ...AUTH..., and everything under `MLFLOW_`,
`AWS_`, `AZURE_`, `WANDB_`...). `redact(text)` replaces

- every occurrence of such a value that is at least MIN_SECRET_CHARS long (shorter values -- `1`, `true` --
  would blank out ordinary words), and
- the value of every `NAME=value` / `NAME: value` assignment of such a name, whatever its length (DeepSpeed's
  slurm runner logs `srun ... --export=ALL,MLFLOW_TRACKING_PASSWORD=...`; a `.deepspeed_env` file can add more)

with `***`. The environment is read at each call (cheap: a few dozen names), so a secret exported after
start-up is covered too.

Used by: the launchers (their output goes through `versatune_ds.supervisor`, which redacts every line
before it reaches the terminal or `$RUN_DIR/logs/`), the CLI's log handler, `config.yaml`, `metrics.jsonl`
and W&B's run config.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from typing import Mapping

MIN_SECRET_CHARS = 6
MASK = "***"
SECRET_NAME = re.compile(
    r"TOKEN|SECRET|PASSW(OR)?D|PASSPHRASE|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|(^|_)KEY($|_)|AUTH(?!OR)|"
    r"^(MLFLOW|AWS|AZURE|WANDB|HF|HUGGING_FACE|GH|GITHUB|OPENAI|ANTHROPIC|COMET|NEPTUNE)_",
    re.IGNORECASE,
)
# Names that match the pattern but never hold a secret (their values are ordinary words or numbers).
NOT_SECRET = frozenset({"TOKENIZERS_PARALLELISM", "WANDB_PROJECT", "WANDB_MODE", "WANDB_DIR", "HF_HOME", "HF_HUB_OFFLINE",
                        "HF_DATASETS_OFFLINE", "HF_DATASETS_CACHE", "HF_HUB_CACHE"})


def secret_names_and_values(environ: Mapping[str, str] | None = None) -> tuple[tuple[str, str], ...]:
    """(name, value) of the environment variables that hold secrets, sorted for caching."""
    env = os.environ if environ is None else environ
    return tuple(sorted((k, v) for k, v in env.items() if v and k not in NOT_SECRET and SECRET_NAME.search(k)))


@functools.lru_cache(maxsize=8)
def _patterns(secrets: tuple[tuple[str, str], ...]) -> tuple[re.Pattern[str] | None, re.Pattern[str] | None]:
    values = sorted({v for _, v in secrets if len(v) >= MIN_SECRET_CHARS}, key=len, reverse=True)  # longest first
    by_value = re.compile("|".join(re.escape(v) for v in values)) if values else None
    names = sorted({k for k, _ in secrets}, key=len, reverse=True)
    # NAME=value, NAME: value, "NAME": "value" -- the value ends at whitespace, a quote, a comma or a semicolon.
    by_name = (
        re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(re.escape(n) for n in names) + r")(\"?\s*[=:]\s*\"?)([^\s\"',;]+)")
        if names else None
    )
    return by_value, by_name


class Redactor:
    """`redact` with the environment's secrets read once (for writers called every step)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._by_value, self._by_name = _patterns(secret_names_and_values(environ))

    def __call__(self, text: str) -> str:
        if self._by_name is not None:
            text = self._by_name.sub(lambda m: m.group(1) + m.group(2) + MASK, text)
        if self._by_value is not None:
            text = self._by_value.sub(MASK, text)
        return text


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """`text` with every secret of the environment (read now) replaced by `***`."""
    return Redactor(environ)(text)


def redact_bytes(data: bytes, environ: Mapping[str, str] | None = None) -> bytes:
    """`redact` for raw output: bytes that are not UTF-8 pass through unchanged."""
    return redact(data.decode("utf-8", errors="surrogateescape"), environ).encode("utf-8", errors="surrogateescape")


class RedactingFormatter(logging.Formatter):
    """A log formatter whose output (message, arguments and traceback) has the secrets taken out."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
