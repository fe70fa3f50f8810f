"""The probe: start token, the per-rank generation plan, per-prompt seeding, resume, and its output files."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from versatune_ds.config.loading import load_config
from versatune_ds.dist import DistEnv
from versatune_ds.domains import Domains
from versatune_ds.engine.models import load_inference_model
from versatune_ds.errors import UserError
from versatune_ds.probe import generation as gen
from versatune_ds.probe import pipeline as probe

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
SINGLE = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=29500, launcher="single")


def test_start_token_bos_then_eos_fallback(caplog):
    with_bos = SimpleNamespace(bos_token_id=1, bos_token="<s>", eos_token_id=2, eos_token="</s>")
    assert gen.start_token(with_bos) == gen.StartToken(1, "bos", "<s>")
    no_bos = SimpleNamespace(bos_token_id=None, bos_token=None, eos_token_id=2, eos_token="</s>")
    with caplog.at_level("WARNING"):
        assert gen.start_token(no_bos) == gen.StartToken(2, "eos", "</s>")
    assert "no BOS" in caplog.text
    with pytest.raises(UserError, match="BOS"):
        gen.start_token(SimpleNamespace(bos_token_id=None, bos_token=None, eos_token_id=None, eos_token=None))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 60), st.integers(1, 5), st.integers(1, 8), st.integers(0, 3))
def test_plan_gives_every_rank_the_same_number_of_calls(num_remaining, world, batch, offset):
    remaining = list(range(offset, offset + num_remaining * 2, 2))  # arbitrary (non-contiguous) indices
    plans = [gen.plan_generation(remaining, world, rank, batch) for rank in range(world)]
    expected_calls = -(-(-(-num_remaining // world)) // batch)  # ceil(ceil(n / world) / batch)
    assert {p.num_calls for p in plans} == {expected_calls}
    assert all(len(p.batches) == p.num_calls for p in plans)
    assert all(len(b) <= batch for p in plans for b in p.batches)
    flat = [i for p in plans for b in p.batches for i in b]
    assert sorted(flat) == remaining  # each prompt exactly once
    shares = [sum(len(b) for b in p.batches) for p in plans]
    assert max(shares) - min(shares) <= 1  # even split


def test_plan_uneven_example():
    plans = [gen.plan_generation(list(range(10)), 3, rank, 2) for rank in range(3)]
    assert [p.batches for p in plans] == [((0, 1), (2, 3)), ((4, 5), (6,)), ((7, 8), (9,))]
    plans = [gen.plan_generation(list(range(5)), 4, rank, 4) for rank in range(4)]
    assert [p.batches for p in plans] == [((0, 1),), ((2,),), ((3,),), ((4,),)]
    assert gen.plan_generation([0], 2, 1, 4).batches == ((),)  # a dummy call


def test_prompt_seed_is_deterministic_and_distinct():
    seeds = [gen.prompt_seed(42, i) for i in range(-1, 1000)]
    assert len(set(seeds)) == len(seeds)
    assert seeds == [gen.prompt_seed(42, i) for i in range(-1, 1000)]
    assert gen.prompt_seed(43, 5) != gen.prompt_seed(42, 5)
    assert all(0 <= s < 2**63 for s in seeds)


def test_prompt_sampler_topk_and_topp_reduce_to_argmax():
    import torch

    scores = torch.tensor([[0.1, 3.0, 0.5, 2.9], [5.0, 0.0, 0.0, 4.9]])
    for kwargs in ({"top_k": 1, "top_p": 1.0}, {"top_k": 0, "top_p": 1e-6}):
        out = gen.PromptSampler([1, 2], temperature=1.0, **kwargs)(None, scores)
        assert out.argmax(dim=-1).tolist() == [1, 0]
        assert torch.isinf(out).sum().item() == 6  # one finite entry per row
    # Same seed, same row -> same draw, whatever else is in the batch.
    a = gen.PromptSampler([7, 8], temperature=1.0, top_k=0, top_p=1.0)(None, torch.zeros(2, 50))
    b = gen.PromptSampler([8], temperature=1.0, top_k=0, top_p=1.0)(None, torch.zeros(1, 50))
    assert a[1].argmax() == b[0].argmax()


def _cfg(model_dir: Path, *overrides: str):
    return load_config(None, [
        f"model.path={model_dir}", f"data.dir={SAMPLE}", "probe.num_samples=7", "probe.batch_size=3",
        "probe.max_new_tokens=8", "classifier.num_bootstrap=50", *overrides,
    ])


def _model(cfg):
    from versatune_ds.data.tokenizer import load_tokenizer

    loaded = load_inference_model(cfg.model, SINGLE, zero3=False)  # keep it alive while `model` is used

    model = loaded.module
    return model, load_tokenizer(cfg.model)


def test_generation_depends_only_on_seed_and_index(tiny_model_dir):
    cfg = _cfg(tiny_model_dir)
    model, tokenizer = _model(cfg)
    start = gen.start_token(tokenizer)
    batch = gen.generate_batch(model, tokenizer, start, [0, 1, 2, 3], cfg, synced_gpus=False)
    alone = gen.generate_batch(model, tokenizer, start, [2], cfg, synced_gpus=False)
    swapped = gen.generate_batch(model, tokenizer, start, [3, 2], cfg, synced_gpus=False)
    assert batch[2] == alone[0] == swapped[1]
    assert len({r["text"] for r in batch}) == 4  # different prompts differ
    assert all(0 <= r["num_tokens"] <= 8 for r in batch)


def test_resume_generates_only_missing_indices(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir)
    model, tokenizer = _model(cfg)
    probe_dir = tmp_path / "probe"
    full = gen.generate_all(cfg, SINGLE, model, tokenizer, probe_dir, zero3=False)
    assert [g["index"] for g in full] == list(range(7))
    lines = (probe_dir / gen.GENERATIONS_FILE).read_text().splitlines()
    # Keep indices 0, 3, 5 plus a torn (half-written) record, as after a crash.
    kept = [line for line in lines if json.loads(line)["index"] in (0, 3, 5)]
    (probe_dir / gen.GENERATIONS_FILE).write_text("\n".join(kept) + "\n" + lines[1][:10])
    resumed = gen.generate_all(cfg, SINGLE, model, tokenizer, probe_dir, zero3=False)
    assert resumed == full  # same texts: seeding is per prompt index
    after = (probe_dir / gen.GENERATIONS_FILE).read_text().splitlines()
    assert after[:3] == kept and len(after) == 7
    assert sorted(json.loads(line)["index"] for line in after) == list(range(7))
    # Nothing left to do: no generate call at all.
    again = gen.generate_all(cfg, SINGLE, None, tokenizer, probe_dir, zero3=False)
    assert again == full
    # Other sampling settings cannot silently extend old generations.
    with pytest.raises(UserError, match="temperature"):
        gen.generate_all(_cfg(tiny_model_dir, "probe.temperature=0.5"), SINGLE, model, tokenizer, probe_dir, zero3=False)


def test_run_probe_writes_distribution_and_classifier_report(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir)
    result = probe.run_probe(cfg, SINGLE, run_dir=tmp_path)
    document = json.loads((tmp_path / "probe" / probe.DISTRIBUTION_FILE).read_text())
    names = list(cfg.domain_names)
    assert document["domains"] == names
    for key in ("p", "ci_low", "ci_high"):
        assert len(document[key]) == len(names)
    assert sum(document["p"]) == pytest.approx(1.0)
    assert all(lo <= p <= hi for lo, p, hi in zip(document["ci_low"], document["p"], document["ci_high"]))
    assert document["num_texts"] == 7 and document["start_token"] == "<s>" and document["start_token_kind"] == "bos"
    np.testing.assert_allclose(result.p, document["p"])
    report = json.loads((tmp_path / "probe" / probe.CLASSIFIER_REPORT_FILE).read_text())
    assert 0.0 <= report["accuracy"] <= 1.0
    assert np.asarray(report["confusion"]).shape == (len(names), len(names))
    assert np.asarray(report["confusion"]).sum() == report["num_test_texts"] > 0
    assert (tmp_path / "probe" / probe.CLASSIFIER_DIR / "classifier.json").is_file()
    # The distribution file is what mixture.distribution reads back.
    np.testing.assert_allclose(probe.read_distribution(tmp_path / "probe" / probe.DISTRIBUTION_FILE, Domains(tuple(names))), result.p)


def test_read_distribution_refuses_other_domains(tmp_path):
    path = tmp_path / "distribution.json"
    path.write_text(json.dumps({"domains": ["a", "b"], "p": [0.5, 0.5]}))
    with pytest.raises(UserError, match="domains"):
        probe.read_distribution(path, Domains(("a", "c")))
    np.testing.assert_allclose(probe.read_distribution(path, Domains(("b", "a"))), [0.5, 0.5])


def test_heldout_split_is_stratified_and_seeded():
    labels = np.array([0] * 10 + [1] * 20 + [2] * 1)
    train, test = probe.heldout_split(labels, 0.2, seed=3)
    assert sorted(train + test) == list(range(31))
    assert np.bincount(labels[test], minlength=3).tolist() == [2, 4, 0]
    assert probe.heldout_split(labels, 0.2, seed=3) == (train, test)


def test_run_probe_with_llm_judge(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, "classifier.kind=llm_judge", f"classifier.judge_model={tiny_model_dir}")
    result = probe.run_probe(cfg, SINGLE, run_dir=tmp_path)
    document = json.loads((tmp_path / "probe" / probe.DISTRIBUTION_FILE).read_text())
    assert document["classifier"] == "llm_judge" and document["num_texts"] == 7
    assert sum(document["p"]) == pytest.approx(1.0) and np.all(result.p > 0)
    assert not (tmp_path / "probe" / probe.CLASSIFIER_REPORT_FILE).exists()  # no TF-IDF classifier trained
    with pytest.raises(UserError, match="judge_model"):
        probe.run_probe(_cfg(tiny_model_dir, "classifier.kind=llm_judge"), SINGLE, run_dir=tmp_path)


def test_adjusted_distribution_undoes_a_known_confusion():
    confusion = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6]])
    truth = np.array([0.6, 0.3, 0.1])
    counts = (truth * 1000).astype(int)
    probs = np.concatenate([np.tile(confusion[d], (counts[d], 1)) for d in range(3)])
    plain = probs.mean(axis=0)
    assert np.abs(plain - truth).sum() > 0.09  # the plain mean is pulled toward uniform
    estimate = probe.adjusted_distribution(probs, confusion, num_bootstrap=200, seed=0)
    np.testing.assert_allclose(estimate.p, truth, atol=1e-9)
    assert estimate.mode == "adjusted" and estimate.num_texts == 1000
    assert all(lo <= p <= hi for lo, p, hi in zip(estimate.ci_low, estimate.p, estimate.ci_high))
    # A measured mean outside the confusion's cone is projected: still a distribution, no negative share.
    odd = probe.adjusted_distribution(np.tile([0.0, 0.0, 1.0], (10, 1)), confusion, num_bootstrap=0, seed=0)
    assert min(odd.p) >= 0 and sum(odd.p) == pytest.approx(1.0)


def test_mean_probability_confusion_rows():
    probs = np.array([[0.9, 0.1, 0.0], [0.7, 0.3, 0.0], [0.2, 0.8, 0.0]])
    matrix = probe.mean_probability_confusion(probs, np.array([0, 0, 1]), 3)
    np.testing.assert_allclose(matrix, [[0.8, 0.2, 0.0], [0.2, 0.8, 0.0], [0.0, 0.0, 1.0]])


def test_run_probe_adjusted_estimator(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, "classifier.estimator=adjusted")
    result = probe.run_probe(cfg, SINGLE, run_dir=tmp_path)
    document = json.loads((tmp_path / "probe" / probe.DISTRIBUTION_FILE).read_text())
    assert document["estimator"] == "adjusted" and sum(document["p"]) == pytest.approx(1.0)
    report = json.loads((tmp_path / "probe" / probe.CLASSIFIER_REPORT_FILE).read_text())
    assert np.asarray(report["mean_probability_confusion"]).shape == (6, 6)
    assert np.all(result.p >= 0)
    with pytest.raises(UserError, match="adjusted"):
        probe.run_probe(_cfg(tiny_model_dir, "classifier.estimator=adjusted", "classifier.kind=llm_judge"), SINGLE, run_dir=tmp_path)


def test_probe_command(tiny_model_dir, tmp_path, capsys):
    from versatune_ds.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  path: {tiny_model_dir}\ndata:\n  dir: {SAMPLE}\ntrain:\n  run_dir: {tmp_path / 'run'}\n")
    overrides = ["probe.num_samples=4", "probe.max_new_tokens=4", "classifier.num_bootstrap=10"]
    assert main(["probe", "--config", str(config), *overrides]) == 0
    assert (tmp_path / "run" / "probe" / probe.DISTRIBUTION_FILE).is_file()
    out = capsys.readouterr().out
    assert "knowledge distribution" in out and "medicine" in out
    assert main(["probe", "--config", str(config), "probe.num_samples=0"]) == 2  # a config error, not a traceback
