"""The run configuration's schema: one tree of frozen dataclasses, and the lists validation checks against.

Loading (YAML, dotted overrides, typed conversion, `file:line` in errors) is in `config.loading`; the checks
that need more than a type are in `config.validation`; hashing and printing a config are in
`config.identity`. Defaults here are what a user gets without writing the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from versatune_ds.errors import UserError
from versatune_ds.mixture.composition import STRATEGIES  # the one list of strategy names
from versatune_ds.mixture.rules import RULES, UpdateRule

DEFAULT_DOMAIN_NAMES: tuple[str, ...] = ("law", "medicine", "finance", "science", "code", "general")

# A data source that names a Hugging Face `datasets` data set instead of a local file.
HF_SOURCE_PREFIX = "hf:"


# The message lists at most this many problems (a hostile file can have tens of thousands); `problems` has all.
MAX_REPORTED = 50


class ConfigError(UserError):
    """Every problem found in a config, one per line."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = tuple(problems)
        where = f" in {source}" if source else ""
        lines = [f"{len(self.problems)} problem(s){where}:"] + [f"  - {p}" for p in self.problems[:MAX_REPORTED]]
        if len(self.problems) > MAX_REPORTED:
            lines.append(f"  ... and {len(self.problems) - MAX_REPORTED} more")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class ColumnsConfig:
    """Which columns of a domain's rows hold what (in the spirit of LLaMA-Factory's dataset_info.json).

    Once a domain has `columns`, only the columns named here are read (LLaMA-Factory does the same), so a
    column the mapping does not name is never trained by accident. Tags name the keys and speaker names
    inside each turn of a `messages` list (defaults: role/content or from/value; user/human, assistant/gpt, ...).
    """

    prompt: str | None = None  # the instruction / question column
    query: str | None = None  # an optional second input, appended to the prompt after a newline
    response: str | None = None  # the answer column
    history: str | None = None  # earlier turns as [[prompt, answer], ...]
    system: str | None = None  # a system prompt column
    messages: str | None = None  # a column holding a list of turns (then prompt/query/response are not used)
    tools: str | None = None  # tool schemas (a list, or its JSON text)
    role_tag: str | None = None  # the key of a turn's speaker (default: role or from)
    content_tag: str | None = None  # the key of a turn's text (default: content or value)
    user_tag: str | None = None  # the speaker name of user turns (besides user / human)
    assistant_tag: str | None = None  # ... of assistant turns (besides assistant / gpt)
    system_tag: str | None = None  # ... of system turns (besides system)
    observation_tag: str | None = None  # ... of tool results (besides tool / observation)
    function_tag: str | None = None  # ... of tool calls (besides function_call / tool_call)


@dataclass(frozen=True)
class DomainConfig:
    name: str
    train: tuple[str, ...] = ()  # files (jsonl/json/csv/tsv/parquet), folders, or `hf:<name>[:<split>]`
    heldout: tuple[str, ...] = ()  # explicit held-out sources; empty = a fixed-seed split of `train`
    raw: tuple[str, ...] = ()  # optional domain-tagged raw text (field `text`) for the probe classifier
    format: str = "auto"  # auto | alpaca | sharegpt | messages
    columns: ColumnsConfig | None = None  # column mapping for rows in other shapes (see ColumnsConfig)


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # local folder or hub name
    tokenizer: str | None = None  # defaults to `path`
    gguf_file: str | None = None  # load weights from a GGUF file inside `path` (dequantised)
    trust_remote_code: bool = False
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    gradient_checkpointing: bool = False

    def for_folder(self, path: str) -> ModelConfig:
        """The same settings for another model folder (an exported model, a judge, a reference): its own
        tokenizer, no GGUF file."""
        return dataclasses.replace(self, path=path, tokenizer=None, gguf_file=None)


@dataclass(frozen=True)
class DataConfig:
    domains: tuple[DomainConfig, ...] = ()
    dir: str | None = None  # where `<name>.jsonl` is looked up for domains given by name only
    seq_len: int = 1024
    packing: bool = True
    # Lay each training micro-batch's rows end to end as one sequence: no compute on pad positions. Needs an
    # attention that keeps examples apart without a mask (sdpa or flash-attention on the model types of
    # engine.document_attention); others keep padded rows, said in a log line.
    padding_free: bool = True
    # auto (the tokenizer's chat template, else `simple` with a warning) | chat_template | a catalogue name
    # (llama3, qwen2.5, mistral, gemma, alpaca; built in: simple, chatml) | a path to a .jinja file
    template: str = "auto"
    loss_on: str = "all_assistant"  # all_assistant | last_assistant; per-turn weight/loss flags apply on top
    truncation: str = "error"  # error | truncate | skip: what to do with an example longer than seq_len
    on_bad_row: str = "error"  # error | skip (skipped rows are counted and reported per file)
    max_row_bytes: int = 4 * 1024 * 1024  # a bigger row is a bad row (refused, or skipped with on_bad_row=skip)
    heldout_fraction: float = 0.05  # used when a domain has no explicit held-out sources
    heldout_max_examples: int = 256
    max_examples_per_domain: int | None = None  # cap on training examples read per domain
    cache_dir: str = "~/.cache/versatune_ds"
    num_proc: int = 1
    lock_timeout_s: int = 3600  # how long a process waits for another one tokenizing the same domain


@dataclass(frozen=True)
class MixtureConfig:
    strategy: str = "versatune"
    unit: str = "tokens"  # examples | tokens: what the weights are shares of
    weights: Mapping[str, float] | None = None  # strategy `fixed`
    distribution: str | None = None  # a probe/distribution.json to use instead of running the probe
    block_size: int = 256  # samples per sampler block; weight changes start at a block boundary
    # The update rule's knobs; their defaults are the rule's own (mixture.rules.UpdateRule), spelled once.
    rule: str = UpdateRule.rule  # versatune | official (the released code's rule, for comparison)
    alpha: float = UpdateRule.alpha
    beta: float = UpdateRule.beta
    eta: float = UpdateRule.eta
    smoothing: float = UpdateRule.smoothing
    floor: float = UpdateRule.floor
    max_change: float | None = UpdateRule.max_change
    noise_k: float = UpdateRule.noise_k  # γ and φ ignore loss differences within noise_k standard errors (0: the published rule)
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
    # Signals that make every rank checkpoint at the next step boundary and exit with code 75 (preemption.py).
    stop_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")
    # A run-directory lock from another host whose heartbeat is older than this is stale (run_lock.py).
    lock_stale_after_s: int = 600


@dataclass(frozen=True)
class EvalConfig:
    every: int = 200
    micro_batch_size: int = 8
    at_start: bool = True
    # Held-out tokens scored per domain at each training evaluation (a fixed subset of the held-out set);
    # null: sized so one evaluation costs about 2 % of the training time between evaluations (eval.heldout).
    max_tokens_per_domain: int | None = None


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500
    every_minutes: float | None = None  # also checkpoint when this much wall-clock time passed since the last one
    keep_last: int = 2
    allow_config_change: bool = False


@dataclass(frozen=True)
class DeepSpeedConfig:
    config: str = "zero3"  # a shipped DeepSpeed config by name (zero2, zero3, zero3_offload, ...) or a JSON path
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
    # tfidf (TF-IDF + logistic regression trained with style augmentation and a fitted temperature) | tfidf_plain
    # (the recipe before that) | embed_blend (tfidf x a sentence-embedding model; the `embed` extra) | tfidf_zeroshot
    # (tfidf x the embedding similarity of each text to the domain names; the `embed` extra) | llm_judge
    kind: str = "tfidf"
    path: str | None = None  # a saved classifier to reuse
    judge_model: str | None = None
    # mean (of per-text probabilities) | hard (label counts) | adjusted (mean, corrected by the trained classifier's
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
    "data.loss_on": ("all_assistant", "last_assistant"),
    "data.truncation": ("error", "truncate", "skip"),
    "data.on_bad_row": ("error", "skip"),
    "mixture.strategy": STRATEGIES,
    "mixture.unit": ("examples", "tokens"),
    "mixture.rule": RULES,
    "train.lr_scheduler": ("cosine", "linear", "constant"),
    "train.on_nonfinite": ("skip", "stop"),
    "dist.backend": ("auto", "nccl", "gloo"),
    "probe.mode": ("replica", "zero3"),
    "classifier.kind": ("tfidf", "tfidf_plain", "embed_blend", "tfidf_zeroshot", "llm_judge"),
    "classifier.estimator": ("mean", "hard", "adjusted"),
    "export.dtype": ("auto", "bf16", "fp16", "fp32"),
}
FORMATS: tuple[str, ...] = ("auto", "alpaca", "sharegpt", "messages")
# data.template: the names that are not a file path (the catalogue lives in versatune_ds.data.chat_templates;
# tests/test_templates.py checks the two lists agree).
TEMPLATE_NAMES: tuple[str, ...] = ("auto", "chat_template", "simple", "chatml", "llama3", "qwen2.5", "qwen", "mistral", "gemma", "alpaca")
POSITIVE_INTS = (
    "data.seq_len", "data.heldout_max_examples", "data.num_proc", "data.max_row_bytes", "data.lock_timeout_s",
    "mixture.block_size", "train.max_steps",
    "train.micro_batch_size", "train.gradient_accumulation_steps", "train.log_every", "eval.every",
    "eval.micro_batch_size", "checkpoint.every", "checkpoint.keep_last", "dist.timeout_s", "probe.num_samples",
    "probe.max_new_tokens", "probe.batch_size", "classifier.num_bootstrap", "train.lock_stale_after_s",
    "eval.max_tokens_per_domain",
)
# What train.stop_signals may name: signals a process can catch that launchers and Slurm send to stop a job.
STOP_SIGNAL_NAMES: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGQUIT", "SIGXCPU")
NON_NEGATIVE_NUMBERS = (
    "train.learning_rate", "train.weight_decay", "train.warmup_steps", "train.max_grad_norm", "mixture.alpha",
    "mixture.beta", "mixture.eta", "mixture.warmup_steps", "mixture.target_ramp_steps", "probe.top_k",
    "mixture.noise_k",
)
UNIT_INTERVAL = (
    "data.heldout_fraction", "mixture.smoothing", "mixture.floor", "mixture.target_share", "train.min_lr_ratio",
    "probe.top_p",
)
