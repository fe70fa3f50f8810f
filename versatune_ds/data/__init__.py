"""Data: sources (files, formats), chat templates and loss masks, tokenization + cache, packing."""
