"""The tokenizer of a model config (with a pad token), and a fingerprint of everything that changes its tokens."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from versatune_ds.config.schema import ModelConfig
from versatune_ds.errors import UserError

logger = logging.getLogger(__name__)


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of `model.tokenizer` (default `model.path`), with a pad token (EOS or UNK when it has none)."""
    name = model.tokenizer or model.path
    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if model.gguf_file and not model.tokenizer:
        kwargs["gguf_file"] = model.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        key = "model.tokenizer" if model.tokenizer else "model.path"
        raise UserError(f"{key}: cannot load a tokenizer from {name!r}: {exc}") from None
    if tokenizer.pad_token is None:
        # Pad positions never carry loss (the collator masks them by position), so reusing EOS is safe.
        for attribute in ("eos_token", "unk_token"):
            token = getattr(tokenizer, attribute)
            if token is not None:
                tokenizer.pad_token = token
                logger.info("the tokenizer has no pad token; padding with its %s %r", attribute.replace("_token", ""), token)
                break
        else:
            raise UserError(f"the tokenizer of {name!r} has no pad, EOS or UNK token; use a tokenizer that defines one")
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything in a tokenizer that changes token ids or rendering."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token]
    digest.update(json.dumps([specials, getattr(tokenizer, "chat_template", None)]).encode())
    return digest.hexdigest()[:16]
