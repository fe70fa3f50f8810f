"""Checks of a typed config that need more than its types: choices, ranges, files, cross-key rules.

`validate(cfg)` returns every problem as a `key: given ...; expected ...` line, so the loader can report
them all at once with their YAML lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from versatune_ds.config.schema import (
    CHOICES,
    FORMATS,
    HF_SOURCE_PREFIX,
    NON_NEGATIVE_NUMBERS,
    POSITIVE_INTS,
    STOP_SIGNAL_NAMES,
    TEMPLATE_NAMES,
    UNIT_INTERVAL,
    ColumnsConfig,
    RunConfig,
)

PATH_KEYS = ("train", "heldout", "raw")  # the data-source lists of a domain


def path_exists(path: Path) -> bool:
    """Path.exists() that says False for names the OS cannot even look up (NUL byte, name too long)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


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
    problems.extend(_validate_template(cfg.data.template, check_files))
    if not cfg.model.path:
        problems.append("model.path: missing; give a local model folder or a hub name (model.path=/path/to/model)")
    if cfg.probe.temperature <= 0:
        problems.append(f"probe.temperature: given {cfg.probe.temperature}; expected a number > 0")
    if cfg.probe.repetition_penalty <= 0:
        problems.append(f"probe.repetition_penalty: given {cfg.probe.repetition_penalty}; expected a number > 0")
    if cfg.classifier.estimator == "adjusted" and cfg.classifier.kind == "llm_judge":
        problems.append("classifier.estimator: given 'adjusted' with classifier.kind=llm_judge; the adjusted estimator needs a "
                        "trained classifier's held-out confusion: use classifier.kind=tfidf, or estimator mean or hard")
    if cfg.mixture.max_change is not None and not 0 < cfg.mixture.max_change <= 1:
        problems.append(f"mixture.max_change: given {cfg.mixture.max_change}; expected a number in (0, 1] or null for no cap")
    if cfg.mixture.reference_fallback_factor <= 0:
        problems.append(f"mixture.reference_fallback_factor: given {cfg.mixture.reference_fallback_factor}; expected a number > 0")
    if cfg.checkpoint.every_minutes is not None and cfg.checkpoint.every_minutes <= 0:
        problems.append(f"checkpoint.every_minutes: given {cfg.checkpoint.every_minutes}; expected a number > 0, or null for none")
    for index, name in enumerate(cfg.train.stop_signals):
        if name not in STOP_SIGNAL_NAMES:
            problems.append(
                f"train.stop_signals[{index}]: given {name!r}; expected signal names out of {', '.join(STOP_SIGNAL_NAMES)} "
                "(SIGKILL and SIGSTOP cannot be caught), or [] for none"
            )
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
        if domain.columns is not None:
            problems.extend(_validate_columns(domain.columns, domain.format, f"{key}.columns"))
        for source_key in PATH_KEYS:
            for i, source in enumerate(getattr(domain, source_key)):
                if check_files and not source.startswith(HF_SOURCE_PREFIX) and not path_exists(Path(source)):
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
    if mixture.weights is not None and mixture.strategy != "fixed":
        # Only `fixed` reads them; any other strategy would train on other weights without a word.
        problems.append(
            f"mixture.weights: given, but mixture.strategy is {mixture.strategy!r}, which does not use them; "
            "set mixture.strategy=fixed or remove mixture.weights"
        )
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


def _validate_template(template: str, check_files: bool) -> list[str]:
    """data.template: a known name, or a path to a Jinja chat template file."""
    if template in TEMPLATE_NAMES:
        return []
    if not template.endswith((".jinja", ".j2")) and "/" not in template:
        return [f"data.template: given {template!r}; expected one of {', '.join(TEMPLATE_NAMES)} or a path to a .jinja file"]
    if check_files and not Path(template).is_file():
        return [f"data.template: file not found: {template}; give a Jinja chat template file (relative paths resolve "
                "against the config file's folder) or a template name"]
    return []


def _validate_columns(columns: ColumnsConfig, fmt: str, key: str) -> list[str]:
    """A column mapping names either a turn list (`messages`) or prompt/response columns, never both."""
    given = {name: value for name, value in vars(columns).items() if value is not None}
    problems = [f"{key}.{name}: given an empty name; expected a column name" for name, value in given.items() if not value.strip()]
    turn_keys = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag", "observation_tag", "function_tag")
    pair_keys = ("prompt", "query", "response", "history")
    if columns.messages is not None:
        both = [name for name in pair_keys if name in given]
        if both:
            problems.append(f"{key}: given both messages and {', '.join(both)}; map either a turn list (messages) "
                            "or prompt/response columns")
        if fmt == "alpaca":
            problems.append(f"{key}.messages: format is 'alpaca' but the mapping names a turn list; set format: auto")
    elif columns.response is None:
        problems.append(f"{key}: map the answer column (response: <column>) or a turn list (messages: <column>)")
    else:
        tags = [name for name in turn_keys if name in given]
        if tags:
            problems.append(f"{key}: {', '.join(tags)} apply to turn lists; they need messages: <column>")
        if columns.prompt is None:
            problems.append(f"{key}: map the prompt column too (prompt: <column>)")
        if fmt in ("sharegpt", "messages"):
            problems.append(f"{key}.response: format is {fmt!r} but the mapping names prompt/response columns; set format: auto")
    return problems
