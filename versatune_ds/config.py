"""The run configuration: one tree of frozen dataclasses, loaded from YAML with dotted overrides.

`load_config(path, overrides)` reads the YAML file, applies `a.b=c` overrides, converts the result into
`RunConfig` while checking every type, then runs `validate` — and raises one `ConfigError` that lists
every problem (key, value given, what is accepted, and the YAML line where there is one). Nothing is
half-loaded: either the whole config is valid or the user gets the full list at once, in the spirit of
torchtune's config validation.

Relative file paths in the YAML file are resolved against the file's own folder, relative paths given
on the command line against the current directory, so a config works from wherever it is launched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from versatune_ds.errors import UserError
from versatune_ds.mixture import RULES, STRATEGIES  # the one list of strategy names

DEFAULT_DOMAIN_NAMES: tuple[str, ...] = ("law", "medicine", "finance", "science", "code", "general")

# A data source that names a Hugging Face `datasets` data set instead of a local file.
HF_SOURCE_PREFIX = "hf:"


class ConfigError(UserError):
    """Every problem found in a config, one per line."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = tuple(problems)
        where = f" in {source}" if source else ""
        lines = [f"{len(self.problems)} problem(s){where}:"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class DomainConfig:
    name: str
    train: tuple[str, ...] = ()  # files (jsonl/json/parquet), folders, or `hf:<name>[:<split>]`
    heldout: tuple[str, ...] = ()  # explicit held-out sources; empty = a fixed-seed split of `train`
    raw: tuple[str, ...] = ()  # optional domain-tagged raw text (field `text`) for the probe classifier
    format: str = "auto"  # auto | alpaca | sharegpt | messages


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # local folder or hub name
    tokenizer: str | None = None  # defaults to `path`
    gguf_file: str | None = None  # load weights from a GGUF file inside `path` (dequantised)
    trust_remote_code: bool = False
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class DataConfig:
    domains: tuple[DomainConfig, ...] = ()
    dir: str | None = None  # where `<name>.jsonl` is looked up for domains given by name only
    seq_len: int = 1024
    packing: bool = True
    template: str = "auto"  # auto (chat template if the tokenizer has one) | chat_template | simple | chatml
    truncation: str = "error"  # error | truncate | skip: what to do with an example longer than seq_len
    on_bad_row: str = "error"  # error | skip (skipped rows are counted and reported per file)
    heldout_fraction: float = 0.05  # used when a domain has no explicit held-out sources
    heldout_max_examples: int = 256
    max_examples_per_domain: int | None = None  # cap on training examples read per domain
    cache_dir: str = "~/.cache/versatune_ds"
    num_proc: int = 1


@dataclass(frozen=True)
class MixtureConfig:
    strategy: str = "versatune"
    unit: str = "tokens"  # examples | tokens: what the weights are shares of
    weights: Mapping[str, float] | None = None  # strategy `fixed`
    distribution: str | None = None  # a probe/distribution.json to use instead of running the probe
    block_size: int = 256  # samples per sampler block; weight changes start at a block boundary
    rule: str = "versatune"  # versatune | official (the released code's rule, for comparison)
    alpha: float = 1.0
    beta: float = 1.0
    eta: float = 1.0
    smoothing: float = 0.1
    floor: float = 0.01
    max_change: float | None = 0.2
    warmup_steps: int = 0
    reference_model: str | None = None
    reference_losses: Mapping[str, float] | None = None
    reference_fallback_factor: float = 0.8
    target_domain: str | None = None
    target_share: float = 0.5
    target_ramp_steps: int = 0


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 42
    max_steps: int = 1000
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    lr_scheduler: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    log_every: int = 1
    trace_samples: bool = False
    on_nonfinite: str = "skip"  # skip | stop


@dataclass(frozen=True)
class EvalConfig:
    every: int = 200
    micro_batch_size: int = 8
    at_start: bool = True


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500
    keep_last: int = 2
    allow_config_change: bool = False


@dataclass(frozen=True)
class DeepSpeedConfig:
    config: str = "ds_configs/zero3.json"  # a bare name (zero3.json) means the repo's ds_configs/ folder
    nvme_path: str | None = None  # fills offload_*.nvme_path of an NVMe-offload DeepSpeed config


@dataclass(frozen=True)
class DistConfig:
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    timeout_s: int = 1800
    master_port: int = 29500


@dataclass(frozen=True)
class ProbeConfig:
    num_samples: int = 512
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.1
    batch_size: int = 32
    mode: str = "replica"  # replica | zero3


@dataclass(frozen=True)
class ClassifierConfig:
    kind: str = "tfidf"  # tfidf | llm_judge
    path: str | None = None  # a saved classifier to reuse
    judge_model: str | None = None
    # mean (of per-text probabilities) | hard (label counts) | adjusted (mean, corrected by the TF-IDF classifier's
    # held-out mean-probability confusion: "adjusted classify and count"; see probe.adjusted_distribution)
    estimator: str = "mean"
    num_bootstrap: int = 1000


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str | None = None
    wandb_run_name: str | None = None


@dataclass(frozen=True)
class ExportConfig:
    at_end: bool = True
    dtype: str = "auto"  # auto (the training dtype) | bf16 | fp16 | fp32


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def domain_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.data.domains)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "model.dtype": ("auto", "bf16", "fp16", "fp32"),
    "data.template": ("auto", "chat_template", "simple", "chatml"),
    "data.truncation": ("error", "truncate", "skip"),
    "data.on_bad_row": ("error", "skip"),
    "mixture.strategy": STRATEGIES,
    "mixture.unit": ("examples", "tokens"),
    "mixture.rule": RULES,
    "train.lr_scheduler": ("cosine", "linear", "constant"),
    "train.on_nonfinite": ("skip", "stop"),
    "dist.backend": ("auto", "nccl", "gloo"),
    "probe.mode": ("replica", "zero3"),
    "classifier.kind": ("tfidf", "llm_judge"),
    "classifier.estimator": ("mean", "hard", "adjusted"),
    "export.dtype": ("auto", "bf16", "fp16", "fp32"),
}
FORMATS: tuple[str, ...] = ("auto", "alpaca", "sharegpt", "messages")
POSITIVE_INTS = (
    "data.seq_len", "data.heldout_max_examples", "data.num_proc", "mixture.block_size", "train.max_steps",
    "train.micro_batch_size", "train.gradient_accumulation_steps", "train.log_every", "eval.every",
    "eval.micro_batch_size", "checkpoint.every", "checkpoint.keep_last", "dist.timeout_s", "probe.num_samples",
    "probe.max_new_tokens", "probe.batch_size", "classifier.num_bootstrap",
)
NON_NEGATIVE_NUMBERS = (
    "train.learning_rate", "train.weight_decay", "train.warmup_steps", "train.max_grad_norm", "mixture.alpha",
    "mixture.beta", "mixture.eta", "mixture.warmup_steps", "mixture.target_ramp_steps", "probe.top_k",
)
UNIT_INTERVAL = (
    "data.heldout_fraction", "mixture.smoothing", "mixture.floor", "mixture.target_share", "train.min_lr_ratio",
    "probe.top_p",
)


# ----------------------------------------------------------------------------------------------
# Loading (the YAML reader, overrides and typed conversion live in config_loader.py)


def load_config(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] = (), *, check_files: bool = True
) -> RunConfig:
    """Read a YAML config (or defaults when `path` is None), apply `a.b=c` overrides, convert and validate.

    Raises one `ConfigError` listing every problem. `check_files=False` skips only the check that local
    data files exist (for validating cluster configs on another machine).
    """
    from versatune_ds.config_loader import read_run_config

    return read_run_config(path, overrides, check_files=check_files)


_PATH_KEYS = ("train", "heldout", "raw")


def _exists(path: Path) -> bool:
    """Path.exists() that says False for names the OS cannot even look up (NUL byte, name too long)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------
# Validation


def _get(cfg: RunConfig, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def validate(cfg: RunConfig, *, check_files: bool = True) -> list[str]:
    """Every problem in a typed config, as `key: given ...; expected ...` lines (empty when valid).

    `check_files=False` skips only the check that local data files exist.
    """
    problems: list[str] = []
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            problems.append(f"{key}: given {value!r}; expected one of {', '.join(allowed)}")
    for key in POSITIVE_INTS:
        value = _get(cfg, key)
        if isinstance(value, int) and value <= 0:
            problems.append(f"{key}: given {value}; expected a positive integer")
    for key in NON_NEGATIVE_NUMBERS:
        value = _get(cfg, key)
        if isinstance(value, (int, float)) and value < 0:
            problems.append(f"{key}: given {value}; expected a number >= 0")
    for key in UNIT_INTERVAL:
        value = _get(cfg, key)
        if isinstance(value, (int, float)) and not 0 <= value <= 1:
            problems.append(f"{key}: given {value}; expected a number between 0 and 1")
    if not cfg.model.path:
        problems.append("model.path: missing; give a local model folder or a hub name (model.path=/path/to/model)")
    if cfg.probe.temperature <= 0:
        problems.append(f"probe.temperature: given {cfg.probe.temperature}; expected a number > 0")
    if cfg.probe.repetition_penalty <= 0:
        problems.append(f"probe.repetition_penalty: given {cfg.probe.repetition_penalty}; expected a number > 0")
    if cfg.mixture.max_change is not None and not 0 < cfg.mixture.max_change <= 1:
        problems.append(f"mixture.max_change: given {cfg.mixture.max_change}; expected a number in (0, 1] or null for no cap")
    if cfg.mixture.reference_fallback_factor <= 0:
        problems.append(f"mixture.reference_fallback_factor: given {cfg.mixture.reference_fallback_factor}; expected a number > 0")
    problems.extend(_validate_domains(cfg, check_files))
    return problems


def _validate_domains(cfg: RunConfig, check_files: bool = True) -> list[str]:
    problems: list[str] = []
    names = [d.name for d in cfg.data.domains]
    seen: set[str] = set()
    for index, domain in enumerate(cfg.data.domains):
        key = f"data.domains[{index}]"
        if not domain.name or not domain.name.replace("_", "").replace("-", "").isalnum():
            problems.append(f"{key}.name: given {domain.name!r}; expected a non-empty name of letters, digits, '-' or '_'")
        if domain.name in seen:
            problems.append(f"{key}.name: domain {domain.name!r} is listed twice; each domain must appear once")
        seen.add(domain.name)
        if not domain.train:
            problems.append(f"{key}.train: domain {domain.name!r} has no training sources; list files, or set data.dir")
        if domain.format not in FORMATS:
            problems.append(f"{key}.format: given {domain.format!r}; expected one of {', '.join(FORMATS)}")
        for source_key in _PATH_KEYS:
            for i, source in enumerate(getattr(domain, source_key)):
                if check_files and not source.startswith(HF_SOURCE_PREFIX) and not _exists(Path(source)):
                    problems.append(
                        f"{key}.{source_key}[{i}]: file not found: {source}; fix the path (relative paths in a config "
                        f"file are resolved against the file's folder) or write hf:<dataset name> for a hub data set"
                    )
    mixture = cfg.mixture
    for map_key in ("weights", "reference_losses"):
        mapping = getattr(mixture, map_key)
        for name, value in (mapping or {}).items():
            if name not in names:
                problems.append(f"mixture.{map_key}.{name}: unknown domain; known domains: {', '.join(names)}")
            elif map_key == "weights" and value < 0:
                problems.append(f"mixture.{map_key}.{name}: given {value}; expected a number >= 0")
            elif map_key == "reference_losses" and value <= 0:
                problems.append(f"mixture.{map_key}.{name}: given {value}; expected a number > 0")
    if mixture.strategy == "fixed":
        missing = [n for n in names if n not in (mixture.weights or {})]
        if missing:
            problems.append(f"mixture.weights: strategy 'fixed' needs a weight for every domain; missing: {', '.join(missing)}")
        elif sum((mixture.weights or {}).values()) <= 0:
            problems.append("mixture.weights: the weights sum to 0; give at least one positive weight")
    if mixture.reference_losses is not None:
        missing = [n for n in names if n not in mixture.reference_losses]
        if missing:
            problems.append(f"mixture.reference_losses: missing domain(s) {', '.join(missing)}; give a loss for every domain")
    if mixture.strategy in ("target_only", "target_plus_uniform") and mixture.target_domain is None:
        problems.append(f"mixture.target_domain: strategy {mixture.strategy!r} needs a target domain; set mixture.target_domain=<name>")
    if mixture.target_domain is not None and mixture.target_domain not in names:
        problems.append(f"mixture.target_domain: given {mixture.target_domain!r}; expected one of {', '.join(names)}")
    if mixture.floor * max(len(names), 1) > 1:
        problems.append(f"mixture.floor: given {mixture.floor}; with {len(names)} domains the floor must be <= {1 / max(len(names), 1):.4f}")
    return problems


# ----------------------------------------------------------------------------------------------
# Output


def config_to_dict(cfg: Any) -> Any:
    """A plain dict/list/scalar tree of a config (dataclasses and mapping proxies unwrapped)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (tuple, list)):
        return [config_to_dict(v) for v in cfg]
    return cfg


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# Keys that do not change what a run computes: a resumed run may change them freely.
HASH_EXCLUDED_KEYS: tuple[str, ...] = (
    "train.run_dir",
    "train.log_every",
    "train.trace_samples",
    "checkpoint",
    "logging",
    "export",
    "dist",
    "data.cache_dir",
    "data.num_proc",
    "deepspeed.nvme_path",
)


def config_hash(cfg: RunConfig, excluded: Sequence[str] = HASH_EXCLUDED_KEYS) -> str:
    """A stable hash of the settings that determine the run's results (for refusing resumes with another config)."""
    tree = config_to_dict(cfg)
    for dotted in excluded:
        node = tree
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node[part]
        node.pop(parts[-1], None)
    canonical = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two `config_to_dict` trees (for resume errors)."""
    keys = sorted(set(old) | set(new))
    out: list[str] = []
    for key in keys:
        path = f"{prefix}.{key}" if prefix else key
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_diff(a, b, path))
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out
