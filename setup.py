"""versatune_ds: multi-domain fine-tuning of causal LMs with DeepSpeed ZeRO-3 and the VersaTune method."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="versatune-ds",
    version="0.1.0",
    description="Multi-domain fine-tuning of causal LMs with DeepSpeed ZeRO-3 and VersaTune data composition",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8")
    if Path(__file__).with_name("README.md").exists()
    else "",
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
        "test": ["pytest>=8", "pytest-timeout", "hypothesis", "tensorboard", "gguf"],
    },
    entry_points={"console_scripts": ["versatune-ds=versatune_ds.cli:main"]},
)
