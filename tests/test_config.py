"""The run config: loading, every validation message, overrides, paths, defaults, hashing, round trip."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from versatune_ds.config.identity import config_diff, config_hash, config_to_dict, config_to_yaml
from versatune_ds.config.loading import load_config
from versatune_ds.config.schema import (
    CHOICES,
    DEFAULT_DOMAIN_NAMES,
    NON_NEGATIVE_NUMBERS,
    POSITIVE_INTS,
    UNIT_INTERVAL,
    ConfigError,
    RunConfig,
)
from versatune_ds.config.validation import validate
from versatune_ds.errors import UserError

SIX = DEFAULT_DOMAIN_NAMES


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    """A folder with `<name>.jsonl` for the six default domains (contents do not matter to the config)."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in SIX:
        (folder / f"{name}.jsonl").write_text('{"instruction": "q", "input": "", "output": "a"}\n', encoding="utf-8")
    return folder


def base(data_dir: Path) -> list[str]:
    """Overrides that make the default config valid."""
    return ["model.path=some-org/some-model", f"data.dir={data_dir}"]


def problems_of(data_dir: Path, *overrides: str, path: Path | None = None) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        load_config(path, [*base(data_dir), *overrides])
    return info.value.problems


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_base_config_is_valid(data_dir: Path) -> None:
    cfg = load_config(None, base(data_dir))
    assert cfg.model.path == "some-org/some-model"
    assert cfg.domain_names == SIX
    assert validate(cfg) == []


# ----------------------------------------------------------------------------------------------
# One test per validation message


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_choice_key_rejects_an_unknown_value(data_dir: Path, key: str) -> None:
    (problem,) = problems_of(data_dir, f"{key}=bogus")
    assert problem.startswith(f"{key}: given 'bogus'; expected one of {', '.join(CHOICES[key])}")


@pytest.mark.parametrize("key", POSITIVE_INTS)
def test_positive_ints(data_dir: Path, key: str) -> None:
    assert problems_of(data_dir, f"{key}=0") == (f"{key}: given 0; expected a positive integer",)
    assert problems_of(data_dir, f"{key}=-3") == (f"{key}: given -3; expected a positive integer",)


@pytest.mark.parametrize("key", NON_NEGATIVE_NUMBERS)
def test_non_negative_numbers(data_dir: Path, key: str) -> None:
    (problem,) = problems_of(data_dir, f"{key}=-1")
    assert re.fullmatch(rf"{re.escape(key)}: given -1(\.0)?; expected a number >= 0", problem)
    load_config(None, [*base(data_dir), f"{key}=0"])  # zero is allowed


@pytest.mark.parametrize("key", UNIT_INTERVAL)
def test_unit_interval(data_dir: Path, key: str) -> None:
    problems = problems_of(data_dir, f"{key}=1.5")
    assert f"{key}: given 1.5; expected a number between 0 and 1" in problems
    assert f"{key}: given -0.1; expected a number between 0 and 1" in problems_of(data_dir, f"{key}=-0.1")


def test_missing_model_path(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.path: missing; give a local model folder or a hub name"):
        load_config(None, [f"data.dir={data_dir}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("probe.temperature=0", "probe.temperature: given 0.0; expected a number > 0"),
        ("probe.repetition_penalty=-1", "probe.repetition_penalty: given -1.0; expected a number > 0"),
        ("mixture.max_change=0", "mixture.max_change: given 0.0; expected a number in (0, 1] or null for no cap"),
        ("mixture.max_change=1.5", "mixture.max_change: given 1.5; expected a number in (0, 1] or null for no cap"),
        ("mixture.reference_fallback_factor=0", "mixture.reference_fallback_factor: given 0.0; expected a number > 0"),
    ],
)
def test_positive_floats(data_dir: Path, override: str, message: str) -> None:
    assert problems_of(data_dir, override) == (message,)


def test_max_change_null_means_no_cap(data_dir: Path) -> None:
    assert load_config(None, [*base(data_dir), "mixture.max_change=null"]).mixture.max_change is None


def test_unknown_key_suggests_the_close_one(data_dir: Path) -> None:
    assert problems_of(data_dir, "train.max_step=5") == ("train.max_step: unknown key; did you mean 'max_steps'?",)
    assert problems_of(data_dir, "trian.seed=1") == ("trian: unknown key; did you mean 'train'?",)


def test_unknown_key_without_a_close_one_lists_the_known_keys(data_dir: Path) -> None:
    (problem,) = problems_of(data_dir, "eval.zzzzzz=1")
    assert problem == "eval.zzzzzz: unknown key; known keys: every, micro_batch_size, at_start, max_tokens_per_domain"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_steps=ten", "train.max_steps: expected an integer, got 'ten'"),
        ("train.max_steps=1.5", "train.max_steps: expected an integer, got 1.5"),
        ("train.max_steps=true", "train.max_steps: expected an integer, got True"),
        ("train.learning_rate=fast", "train.learning_rate: expected a finite number, got 'fast'"),
        ("train.learning_rate=nan", "train.learning_rate: expected a finite number, got nan"),
        ("train.learning_rate=.nan", "train.learning_rate: expected a finite number, got nan"),
        ("train.learning_rate=.inf", "train.learning_rate: expected a finite number, got inf"),
        ("data.packing=1", "data.packing: expected true or false, got 1"),
        ("model.path=5", "model.path: expected a string, got 5"),
        ("data.domains=5", "data.domains: expected a list, got 5"),
        ("mixture.weights=3", "mixture.weights: expected a mapping of domain name to number, got 3"),
        ("mixture.weights={law: x}", "mixture.weights.law: expected a finite number, got 'x'"),
        ("mixture.weights={law: true}", "mixture.weights.law: expected a finite number, got True"),
        ("model=5", "model: expected a mapping of keys, got 5"),
        ("data.domains=[5]", "data.domains[0]: expected a mapping of keys, got 5"),
        ("data.domains=[{train: x.jsonl}]", "data.domains[0].name: missing; every domain needs a name (name: law)"),
    ],
)
def test_wrong_types(data_dir: Path, override: str, message: str) -> None:
    assert message in problems_of(data_dir, override)


def test_duplicate_domain(data_dir: Path) -> None:
    problems = problems_of(data_dir, "data.domains=[law, medicine, law]")
    assert problems == ("data.domains[2].name: domain 'law' is listed twice; each domain must appear once",)


def test_domain_without_training_sources(data_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.path=m", "data.domains=[law]"])
    assert info.value.problems == ("data.domains[0].train: domain 'law' has no training sources; list files, or set data.dir",)


def test_default_domains_without_data_dir_name_every_domain(data_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.path=m"])
    assert [p.split(":")[0] for p in info.value.problems] == [f"data.domains[{i}].train" for i in range(6)]


def test_bad_domain_name_and_format(data_dir: Path) -> None:
    problems = problems_of(data_dir, "data.domains=[{name: 'law school', train: " + str(data_dir / "law.jsonl") + ", format: csv}]")
    assert "data.domains[0].name: given 'law school'; expected a non-empty name of letters, digits, '-' or '_'" in problems
    assert "data.domains[0].format: given 'csv'; expected one of auto, alpaca, sharegpt, messages" in problems


def test_file_not_found(data_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    (problem,) = problems_of(data_dir, "data.domains=[law]", f"data.domains.law.raw={missing}")
    assert problem.startswith(f"data.domains[0].raw[0]: file not found: {missing}; fix the path")


def test_check_files_false_skips_only_the_file_check(tmp_path: Path) -> None:
    overrides = ["model.path=m", "data.domains=[{name: law, train: /no/such/file.jsonl}]"]
    with pytest.raises(ConfigError, match="file not found"):
        load_config(None, overrides)
    cfg = load_config(None, overrides, check_files=False)
    assert cfg.data.domains[0].train == ("/no/such/file.jsonl",)
    assert validate(cfg, check_files=False) == []
    with pytest.raises(ConfigError, match="train.max_steps: given 0"):  # every other check still runs
        load_config(None, [*overrides, "train.max_steps=0"], check_files=False)


def test_hf_sources_are_not_checked_or_resolved(data_dir: Path) -> None:
    cfg = load_config(None, [*base(data_dir), "data.domains=[{name: law, train: 'hf:org/legal:train'}]"])
    assert cfg.data.domains[0].train == ("hf:org/legal:train",)


@pytest.mark.parametrize("map_key", ["weights", "reference_losses"])
def test_mapping_with_an_unknown_domain(data_dir: Path, map_key: str) -> None:
    values = ", ".join(f"{n}: 1" for n in SIX)
    problems = problems_of(data_dir, f"mixture.{map_key}={{{values}, poetry: 1}}")
    assert f"mixture.{map_key}.poetry: unknown domain; known domains: {', '.join(SIX)}" in problems


def test_negative_weight_and_non_positive_reference_loss(data_dir: Path) -> None:
    assert "mixture.weights.law: given -1.0; expected a number >= 0" in problems_of(data_dir, "mixture.weights={law: -1}")
    ones = ", ".join(f"{n}: 1" for n in SIX[1:])
    load_config(None, [*base(data_dir), "mixture.strategy=fixed", f"mixture.weights={{law: 0, {ones}}}"])  # zero is allowed
    losses = ", ".join(f"{n}: 2.0" for n in SIX[1:])
    problems = problems_of(data_dir, f"mixture.reference_losses={{law: 0, {losses}}}")
    assert problems == ("mixture.reference_losses.law: given 0.0; expected a number > 0",)


def test_reference_losses_must_cover_every_domain(data_dir: Path) -> None:
    problems = problems_of(data_dir, "mixture.reference_losses={law: 2.0}")
    assert problems == (f"mixture.reference_losses: missing domain(s) {', '.join(SIX[1:])}; give a loss for every domain",)


def test_fixed_strategy_needs_every_weight(data_dir: Path) -> None:
    problems = problems_of(data_dir, "mixture.strategy=fixed", "mixture.weights={law: 1, code: 1}")
    assert problems == ("mixture.weights: strategy 'fixed' needs a weight for every domain; missing: medicine, finance, science, general",)
    zeros = ", ".join(f"{n}: 0" for n in SIX)
    problems = problems_of(data_dir, "mixture.strategy=fixed", f"mixture.weights={{{zeros}}}")
    assert problems == ("mixture.weights: the weights sum to 0; give at least one positive weight",)
    ones = ", ".join(f"{n}: 1" for n in SIX)
    cfg = load_config(None, [*base(data_dir), "mixture.strategy=fixed", f"mixture.weights={{{ones}}}"])
    assert dict(cfg.mixture.weights) == {n: 1.0 for n in SIX}


@pytest.mark.parametrize("strategy", ["versatune", "uniform", "proportional", "versatune_static"])
def test_weights_with_a_strategy_that_ignores_them_are_refused(data_dir: Path, strategy: str) -> None:
    """mixture.weights with any strategy but `fixed` was ignored without a word."""
    ones = ", ".join(f"{n}: 1" for n in SIX)
    problems = problems_of(data_dir, f"mixture.strategy={strategy}", f"mixture.weights={{{ones}}}")
    assert problems == (
        f"mixture.weights: given, but mixture.strategy is {strategy!r}, which does not use them; "
        "set mixture.strategy=fixed or remove mixture.weights",
    )


def test_new_operations_keys(data_dir: Path) -> None:
    cfg = load_config(None, base(data_dir))
    assert cfg.train.stop_signals == ("SIGTERM", "SIGUSR1") and cfg.checkpoint.every_minutes is None
    cfg = load_config(None, [*base(data_dir), "train.stop_signals=SIGUSR2", "checkpoint.every_minutes=30"])
    assert cfg.train.stop_signals == ("SIGUSR2",) and cfg.checkpoint.every_minutes == 30.0
    assert load_config(None, [*base(data_dir), "train.stop_signals=[]"]).train.stop_signals == ()
    problems = problems_of(data_dir, "train.stop_signals=[SIGTERM, SIGKILL]", "checkpoint.every_minutes=0", "train.lock_stale_after_s=0")
    assert any(p.startswith("train.stop_signals[1]: given 'SIGKILL'; expected signal names out of SIGTERM") for p in problems)
    assert "checkpoint.every_minutes: given 0.0; expected a number > 0, or null for none" in problems
    assert "train.lock_stale_after_s: given 0; expected a positive integer" in problems
    # Where a run stops, how often it checkpoints by the clock and its lock do not change results: resume freely.
    changed = load_config(None, [*base(data_dir), "train.stop_signals=[]", "train.lock_stale_after_s=5", "checkpoint.every_minutes=1"])
    assert config_hash(changed) == config_hash(cfg)


@pytest.mark.parametrize("strategy", ["target_only", "target_plus_uniform"])
def test_target_strategies_need_a_target(data_dir: Path, strategy: str) -> None:
    problems = problems_of(data_dir, f"mixture.strategy={strategy}")
    assert problems == (f"mixture.target_domain: strategy {strategy!r} needs a target domain; set mixture.target_domain=<name>",)
    assert load_config(None, [*base(data_dir), f"mixture.strategy={strategy}", "mixture.target_domain=code"]).mixture.target_domain == "code"


def test_unknown_target_domain(data_dir: Path) -> None:
    problems = problems_of(data_dir, "mixture.target_domain=poetry")
    assert problems == (f"mixture.target_domain: given 'poetry'; expected one of {', '.join(SIX)}",)


def test_floor_too_high_for_the_number_of_domains(data_dir: Path) -> None:
    problems = problems_of(data_dir, "mixture.floor=0.2")
    assert problems == ("mixture.floor: given 0.2; with 6 domains the floor must be <= 0.1667",)
    load_config(None, [*base(data_dir), "mixture.floor=0.2", "data.domains=[law, code]"])  # 2 domains: fine


def test_validate_copes_with_an_empty_domain_list() -> None:
    cfg = dataclasses.replace(RunConfig(), mixture=dataclasses.replace(RunConfig().mixture, floor=2.0))
    problems = validate(cfg)
    assert "mixture.floor: given 2.0; with 0 domains the floor must be <= 1.0000" in problems
    assert any(p.startswith("model.path: missing") for p in problems)


def test_one_error_lists_every_problem(data_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"data.dir={data_dir}", "train.max_steps=0", "eval.every=0", "probe.mode=fast", "mixture.floor=0.5"])
    keys = [p.split(":")[0] for p in info.value.problems]
    assert keys == ["probe.mode", "train.max_steps", "eval.every", "model.path", "mixture.floor"]
    assert str(info.value).startswith("5 problem(s):\n  - probe.mode")
    # Type problems are collected together too (they stop before the value checks).
    with pytest.raises(ConfigError) as info:
        load_config(None, [*base(data_dir), "train.max_steps=x", "eval.bogus=1", "data.packing=2"])
    assert len(info.value.problems) == 3


def test_config_error_is_a_user_error() -> None:
    assert issubclass(ConfigError, UserError)


# ----------------------------------------------------------------------------------------------
# Files: line numbers, unreadable files


def test_yaml_problems_carry_file_and_line(tmp_path: Path, data_dir: Path) -> None:
    path = write(
        tmp_path,
        f"""\
        model:
          path: m
        data:
          dir: {data_dir}
        train:
          max_step: 5
        eval:
          every: 0
        """,
    )
    with pytest.raises(ConfigError) as info:  # a type-stage problem
        load_config(path)
    assert info.value.problems == (f"train.max_step: unknown key; did you mean 'max_steps'? ({path}:6)",)
    assert f"in {path}:" in str(info.value)
    path.write_text(path.read_text().replace("max_step:", "max_steps:"))
    with pytest.raises(ConfigError) as info:  # a validation-stage problem
        load_config(path)
    assert info.value.problems == (f"eval.every: given 0; expected a positive integer ({path}:8)",)


def test_problem_on_a_filled_in_value_points_at_the_nearest_yaml_key(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    path = write(
        tmp_path,
        """\
        model: {path: m}
        data:
          dir: data
          domains:
            - law
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.startswith("data.domains[0].train[0]: file not found")
    assert problem.endswith(f"({path}:5)")


def test_override_problems_have_no_line(data_dir: Path, tmp_path: Path) -> None:
    path = write(tmp_path, f"model: {{path: m}}\ndata: {{dir: {data_dir}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["probe.top_k=-2"])
    assert info.value.problems == ("probe.top_k: given -2; expected a number >= 0",)


def test_config_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_config_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: {path: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"is not UTF-8 text \(invalid continuation byte at byte 17\)"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("model: [unclosed\n", r"is not valid YAML"),
        ("train:\n  seed: 1\n seed: 2\n", r"is not valid YAML"),
        ("when: 2020-13-45\n", r"is not valid YAML: month must be in 1\.\.12"),
        ("- model\n- data\n", r"must hold a mapping of sections \(model:, data:, \.\.\.\), got list"),
        ("just text\n", r"must hold a mapping of sections .* got str"),
    ],
)
def test_unreadable_yaml(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(UserError, match=pattern):
        load_config(write(tmp_path, text))


def test_empty_file_means_defaults(tmp_path: Path, data_dir: Path) -> None:
    cfg = load_config(write(tmp_path, ""), base(data_dir))
    assert cfg.train == RunConfig().train


def test_recursive_alias_is_an_error_not_a_crash(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(UserError, match=r"run\.yaml:1: a YAML alias refers to a mapping or list that contains it"):
        load_config(write(tmp_path, "loop: &a [*a]\n"), base(data_dir))


# ----------------------------------------------------------------------------------------------
# Overrides


def test_scalar_overrides(data_dir: Path) -> None:
    cfg = load_config(
        None,
        [*base(data_dir), "train.max_steps=7", "train.learning_rate=3e-4", "data.packing=false", "model.tokenizer=tok", "train.run_dir= runs/x y"],
    )
    assert (cfg.train.max_steps, cfg.train.learning_rate, cfg.data.packing) == (7, 3e-4, False)
    assert cfg.model.tokenizer == "tok"
    assert cfg.train.run_dir == "runs/x y"
    assert isinstance(cfg.train.learning_rate, float)


def test_int_given_for_a_float_becomes_a_float(data_dir: Path) -> None:
    assert load_config(None, [*base(data_dir), "train.learning_rate=1"]).train.learning_rate == 1.0


def test_override_a_list(data_dir: Path) -> None:
    cfg = load_config(None, [*base(data_dir), "data.domains=[law, code]"])
    assert cfg.domain_names == ("law", "code")
    assert cfg.data.domains[1].train == (str(data_dir / "code.jsonl"),)


def test_override_a_domain_by_position_and_by_name(tmp_path: Path, data_dir: Path) -> None:
    path = write(
        tmp_path,
        f"""\
        model: {{path: m}}
        data:
          dir: {data_dir}
          domains:
            - law
            - {{name: code, format: alpaca}}
        """,
    )
    cfg = load_config(path, ["data.domains.0.format=sharegpt", "data.domains.code.format=messages"])
    assert [d.format for d in cfg.data.domains] == ["sharegpt", "messages"]
    cfg = load_config(path, ["data.domains.law.format=alpaca"])  # a domain given as a bare name
    assert cfg.data.domains[0].format == "alpaca"
    assert cfg.data.domains[0].name == "law"


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("train.max_steps", r"has no '='.*key=value"),
        ("=5", r"has an empty key"),
        ("train.max_steps=[1", r"the value is not valid YAML"),
        ("train.seed=2020-13-45", r"the value is not valid YAML"),
        ("model.path.sub=1", r"model\.path is a value, not a section"),
        ("model.path.sub.deeper=1", r"model\.path is a value, not a section"),
        ("data.domains.0.name.x=1", r"data\.domains\.0\.name is a value, not a section"),
        ("data.domains.9.format=alpaca", r"data\.domains\.9 matches no list element \(use a position 0\.\.1 or a domain name\)"),
        ("data.domains.poetry.format=alpaca", r"data\.domains\.poetry matches no list element"),
        ("data.domains.².format=alpaca", r"matches no list element"),
    ],
)
def test_bad_override_syntax(tmp_path: Path, override: str, pattern: str) -> None:
    path = write(tmp_path, "model: {path: m}\ndata:\n  domains: [law, code]\n")
    with pytest.raises(UserError, match=pattern):
        load_config(path, [override])


def test_override_creates_missing_sections(data_dir: Path) -> None:
    cfg = load_config(None, [*base(data_dir), "probe.num_samples=8", "classifier.path=clf"])
    assert cfg.probe.num_samples == 8
    assert cfg.classifier.path == "clf"


# ----------------------------------------------------------------------------------------------
# Paths


def test_yaml_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "data").mkdir()
    (project / "ds").mkdir()
    for name in ("law", "law_raw", "code"):
        (project / "data" / f"{name}.jsonl").write_text("{}\n")
    (project / "ds" / "z3.json").write_text("{}")
    (project / "model").mkdir()
    path = write(
        project / "configs",
        """\
        model: {path: ../model, tokenizer: ../tokenizer-made-later}
        data:
          dir: ../data
          domains:
            - {name: law, raw: ../data/law_raw.jsonl}
            - {name: code, train: [../data/code.jsonl]}
        deepspeed: {config: ../ds/z3.json}
        """,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path)
    law, code = cfg.data.domains
    assert law.train == (str(project / "data" / "law.jsonl"),)
    assert law.raw == (str(project / "data" / "law_raw.jsonl"),)
    assert code.train == (str(project / "data" / "code.jsonl"),)
    assert cfg.data.dir == str(project / "data")
    assert cfg.model.path == str(project / "model")
    assert cfg.model.tokenizer == str(project / "tokenizer-made-later")  # explicit ../ resolves even if absent
    assert cfg.deepspeed.config == str(project / "ds" / "z3.json")


def test_hub_names_and_defaults_stay_as_written(tmp_path: Path, data_dir: Path) -> None:
    path = write(tmp_path, f"model: {{path: HuggingFaceTB/SmolLM2-135M}}\ndata: {{dir: {data_dir}}}\n")
    cfg = load_config(path)
    assert cfg.model.path == "HuggingFaceTB/SmolLM2-135M"
    assert cfg.deepspeed.config == "zero3"  # the default names a shipped DeepSpeed config


def test_override_paths_are_relative_to_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "law.jsonl").write_text("{}\n")
    (tmp_path / "cfg").mkdir()
    path = write(tmp_path / "cfg", "model: {path: m}\ndata: {domains: [law]}\n")
    monkeypatch.chdir(tmp_path / "cwd")
    cfg = load_config(path, ["data.domains.law.train=law.jsonl"])
    assert cfg.data.domains[0].train == ("law.jsonl",)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="file not found: law.jsonl"):
        load_config(path, ["data.domains.law.train=law.jsonl"])


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "law.jsonl").write_text("{}\n")
    path = write(tmp_path, "model: {path: m}\ndata: {domains: [{name: law, train: ~/law.jsonl}]}\n")
    assert load_config(path).data.domains[0].train == (str(tmp_path / "law.jsonl"),)


# ----------------------------------------------------------------------------------------------
# Defaults, hashing, diff, round trip


def test_defaults_are_the_six_domains_from_data_dir(data_dir: Path) -> None:
    cfg = load_config(None, base(data_dir))
    assert SIX == ("law", "medicine", "finance", "science", "code", "general")
    assert [d.train for d in cfg.data.domains] == [(str(data_dir / f"{n}.jsonl"),) for n in SIX]
    assert all(d.format == "auto" and d.heldout == () and d.raw == () for d in cfg.data.domains)
    assert cfg.deepspeed.config == "zero3"
    assert cfg.mixture.strategy == "versatune"


def test_configs_are_frozen(data_dir: Path) -> None:
    cfg = load_config(None, base(data_dir))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_steps = 5  # type: ignore[misc]


def test_config_hash_is_stable_and_sensitive(data_dir: Path) -> None:
    first = config_hash(load_config(None, base(data_dir)))
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    assert config_hash(load_config(None, base(data_dir))) == first
    assert config_hash(load_config(None, [*base(data_dir), "train.learning_rate=1e-3"])) != first
    assert config_hash(load_config(None, [*base(data_dir), "mixture.eta=0.5"])) != first


@pytest.mark.parametrize(
    "override",
    ["train.run_dir=elsewhere", "train.log_every=9", "checkpoint.every=7", "logging.tensorboard=true", "dist.timeout_s=60", "data.num_proc=4", "export.dtype=bf16"],
)
def test_config_hash_ignores_excluded_keys(data_dir: Path, override: str) -> None:
    cfg = load_config(None, base(data_dir))
    changed = load_config(None, [*base(data_dir), override])
    assert changed != cfg
    assert config_hash(changed) == config_hash(cfg)


def test_config_hash_does_not_touch_the_config(data_dir: Path) -> None:
    cfg = load_config(None, base(data_dir))
    before = config_to_dict(cfg)
    config_hash(cfg)
    assert config_to_dict(cfg) == before


def test_config_diff(data_dir: Path) -> None:
    old = config_to_dict(load_config(None, base(data_dir)))
    new = config_to_dict(load_config(None, [*base(data_dir), "train.max_steps=5", "mixture.eta=0.5"]))
    assert config_diff(old, new) == ["mixture.eta: 1.0 -> 0.5", "train.max_steps: 1000 -> 5"]
    assert config_diff(old, old) == []
    assert config_diff({"a": {"b": 1}}, {"a": {}, "c": 2}) == ["a.b: 1 -> None", "c: None -> 2"]


def test_yaml_round_trip(tmp_path: Path, data_dir: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    cfg = load_config(
        None,
        [
            f"model.path={model}",
            f"data.dir={data_dir}",
            "data.domains=[law, {name: code, format: alpaca}]",
            "mixture.strategy=fixed",
            "mixture.weights={law: 1, code: 3}",
            "mixture.reference_losses={law: 2.5, code: 1.5}",
            "train.learning_rate=3e-4",
            "mixture.max_change=null",
        ],
    )
    other = tmp_path / "other"
    other.mkdir()
    dumped = other / "config.yaml"
    dumped.write_text(config_to_yaml(cfg), encoding="utf-8")
    again = load_config(dumped)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)


def test_a_key_given_twice_is_an_error(tmp_path: Path, data_dir: Path) -> None:
    path = write(tmp_path, f"model: {{path: m}}\ndata: {{dir: {data_dir}}}\ntrain:\n  max_steps: 5\n  seed: 1\n  max_steps: 10\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == ("train.max_steps: given twice (lines 4 and 6); keep one",)


@pytest.mark.parametrize("name", ["a\0b", "../a\0b", "x" * 5000, "x/" * 3000])
def test_paths_the_os_cannot_look_up_are_reported_not_crashed(tmp_path: Path, name: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": name, "tokenizer": name}, "data": {"domains": [{"name": "law", "train": name}]}}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [p.split(":")[0] for p in info.value.problems] == ["data.domains[0].train[0]"]
    assert "file not found" in info.value.problems[0]


# ----------------------------------------------------------------------------------------------
# Hostile YAML: bounded time and memory, a clear error instead of a RecursionError or an exhausted machine


def billion_laughs(levels: int, fan_out: int = 10) -> str:
    """Each anchor a list of `fan_out` aliases of the previous one: fan_out ** levels values once expanded."""
    lines = ["model: {path: m}", 'l0: &l0 ["lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan_out)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


HOSTILE_YAML = {
    "billion_laughs": (billion_laughs(9), r"expands to more than 100000 values through YAML aliases"),
    "deep_flow": ("model: " + "[" * 100_000 + "]" * 100_000 + "\n", r"opens more than 256 flow brackets"),
    "deep_flow_under_the_bracket_scan": ("model: " + "[" * 200 + "]" * 200 + "\n", r"run\.yaml:1 nests mappings / lists more than 64"),
    "deep_block": ("".join("  " * i + f"k{i}:\n" for i in range(300)) + "  " * 300 + "x: 1\n", r"run\.yaml:65 nests mappings"),
    "alias_chain": ("x0: &x0 [1]\n" + "".join(f"x{i}: &x{i} [*x{i - 1}]\n" for i in range(1, 500)), r"levels deep through YAML aliases"),
    "too_big": ("# " + "x" * 300_000 + "\n", r"is 300003 characters long; a run config is refused above 262144"),
}


def test_the_loader_walks_each_alias_node_once(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """4 levels of 10-fold aliases (10^4 values expanded): the line walk used to visit every expanded value."""
    from versatune_ds.config import yaml_source

    calls = 0
    original = yaml_source.collect_lines

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(yaml_source, "collect_lines", counting)  # the walk's recursive calls go through this name
    with pytest.raises(ConfigError, match="l0: unknown key"):
        load_config(write(tmp_path, billion_laughs(4) + f"data: {{dir: {data_dir}}}\n"))
    assert 0 < calls < 100, calls  # each node once (a few dozen), not the 11 111 nodes of the expanded tree


@pytest.mark.parametrize("name", sorted(HOSTILE_YAML))
def test_hostile_yaml_is_refused_quickly_in_little_memory(tmp_path: Path, name: str) -> None:
    """Each case runs in a child process capped at 2 GiB of address space and 60 s: on a loader without the
    bounds it fails by running out of memory or time instead of taking the machine down."""
    import subprocess
    import sys

    text, pattern = HOSTILE_YAML[name]
    path = write(tmp_path, text)
    program = textwrap.dedent(
        f"""
        import resource, sys, time, tracemalloc
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from versatune_ds.config.loading import load_config
        from versatune_ds.errors import UserError
        tracemalloc.start()
        started = time.perf_counter()
        try:
            load_config({str(path)!r})
        except UserError as exc:
            message = str(exc)
        else:
            message = "loaded"
        print(time.perf_counter() - started, tracemalloc.get_traced_memory()[1])
        print(message)
        """
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    first, message = done.stdout.split("\n", 1)
    seconds, peak_bytes = float(first.split()[0]), int(first.split()[1])
    assert re.search(pattern, message), message
    assert "Traceback" not in done.stderr
    assert peak_bytes < 64 * 2**20, f"{peak_bytes / 2**20:.1f} MiB"
    assert seconds < 20, f"{seconds:.1f} s"


@pytest.mark.parametrize("columns, message", [
    ({"prompt": "q"}, "data.domains[0].columns: map the answer column (response: <column>) or a turn list (messages: <column>)"),
    ({"response": "a"}, "data.domains[0].columns: map the prompt column too (prompt: <column>)"),
    ({"messages": "chat", "prompt": "q"}, "data.domains[0].columns: given both messages and prompt"),
    ({"prompt": "q", "response": "a", "role_tag": "who"}, "role_tag apply to turn lists; they need messages: <column>"),
    ({"messages": "chat", "speaker": "who"}, "data.domains[0].columns.speaker: unknown key"),
    ({"messages": ""}, "data.domains[0].columns.messages: given an empty name"),
])
def test_column_mappings_are_checked(data_dir: Path, columns: dict, message: str) -> None:
    domain = {"name": "law", "train": str(data_dir / "law.jsonl"), "columns": columns}
    with pytest.raises(UserError) as info:
        load_config(None, ["model.path=m", f"data.domains=[{yaml.safe_dump(domain, default_flow_style=True).strip()}]"])
    assert message in str(info.value)


def test_a_column_mapping_and_the_data_settings_load(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "mine.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    path = write(tmp_path, textwrap.dedent(f"""\
        model: {{path: m}}
        data:
          template: mine.jinja
          loss_on: last_assistant
          max_row_bytes: 1000
          domains:
            - name: law
              train: {data_dir / "law.jsonl"}
              columns: {{prompt: question, response: answer, system: persona}}
        """))
    cfg = load_config(path)
    assert cfg.data.template == str(tmp_path / "mine.jinja")  # resolved against the config file's folder
    assert cfg.data.domains[0].columns.prompt == "question" and cfg.data.domains[0].columns.query is None
    assert cfg.data.loss_on == "last_assistant" and cfg.data.max_row_bytes == 1000
    assert load_config(path, ["data.template=llama3"]).data.template == "llama3"
    with pytest.raises(UserError, match="data.template: given 'llama4'; expected one of auto, chat_template, simple"):
        load_config(path, ["data.template=llama4"])
    with pytest.raises(UserError, match="data.template: file not found: .*other.jinja"):
        load_config(path, [f"data.template={tmp_path / 'other.jinja'}"])
    with pytest.raises(UserError, match="data.loss_on: given 'everything'; expected one of all_assistant, last_assistant"):
        load_config(path, ["data.loss_on=everything"])
    # Waiting longer for another process's tokenization does not change what a run computes.
    assert config_hash(cfg) == config_hash(load_config(path, ["data.lock_timeout_s=10"]))
