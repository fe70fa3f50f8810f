"""Shared fixtures: a tiny Llama and tokenizer built on the fly (never downloaded), and data helpers."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VERSATUNE_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files of multi-process tests first (real Slurm clusters, then 2-rank runs), each file kept whole. Under
    pytest-xdist's --dist loadscope the workers take files in this order, so the minute-long files start early
    and the seconds-long unit files fill in at the end, instead of two long files forming the tail."""
    rank: dict[Path, int] = {}
    for item in items:
        kind = 0 if item.get_closest_marker("slurm") else 1 if item.get_closest_marker("dist") else 2
        rank[item.path] = min(kind, rank.get(item.path, 2))
    items.sort(key=lambda item: rank[item.path])  # stable: a file's own order is kept


# Text the tiny tokenizer is trained on: a bit of every default domain's style, code and chat markers.
TOKENIZER_TEXTS = [
    "The court held that the contract clause was unenforceable under state law.",
    "The patient presented with fever and was treated with antibiotics for seven days.",
    "Revenue increased by 12 percent to 4.5 million dollars in the fiscal year.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Write a short poem about the sea. The waves roll in and out again.",
    "### Instruction:\nSummarize the text.\n\n### Response:\nA summary.",
] * 20


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with a byte-level BPE tokenizer and a chat template."""
    from versatune_ds.tiny_model import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"), TOKENIZER_TEXTS, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir_no_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model, but its tokenizer has no chat template (the built-in template is used)."""
    from versatune_ds.tiny_model import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_model_nt"), TOKENIZER_TEXTS, seed=0, chat_template=False)


@pytest.fixture()
def shared_data() -> Path:
    """The real multi-domain data bundle (../shared/data); tests that need it skip with a clear reason if absent."""
    if not (SHARED_DATA / "sft").is_dir():
        pytest.skip(f"real data bundle not found at {SHARED_DATA} (set VERSATUNE_SHARED_DATA to its folder)")
    return SHARED_DATA


@pytest.fixture()
def run_cli(capsys: pytest.CaptureFixture[str]):
    """Run `versatune_ds.cli.main(argv)` in-process; returns (exit code, stdout, stderr).

    main() installs its own logging handler on the root logger: restore the root logger afterwards so
    the rest of the test session keeps pytest's handlers.
    """
    from versatune_ds import cli

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)

    def run(argv: list[str]) -> tuple[int, str, str]:
        try:
            code = cli.main(argv)
        finally:
            root.handlers[:], _ = saved[0][:], root.setLevel(saved[1])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
