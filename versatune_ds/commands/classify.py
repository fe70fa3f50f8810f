"""`versatune-ds classify`: label the rows of a file by domain with the probe's classifier for a config."""

from __future__ import annotations

import argparse

HELP = "label rows by domain with the probe's classifier (trained for the config, or loaded from the run directory)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML (its domains, their texts and classifier.*)")
    parser.add_argument("--input", required=True, help="rows to classify (JSONL, JSON, CSV/TSV or parquet)")
    parser.add_argument("--field", default="text", help="the text field; several joined by newlines: instruction,input,output")
    parser.add_argument("--out", required=True, help="predictions JSONL: per row the domain and every domain's probability")
    parser.add_argument("--labels-field", default=None, help="a field holding the true domain: print accuracy and the confusion matrix")
    parser.add_argument("--run-dir", default=None, help="where the classifier is saved or reused (default: train.run_dir)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. classifier.kind=tfidf_plain")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from versatune_ds.probe.labelling import ClassifyRequest, run_classify, summary_lines

    fields = tuple(name.strip() for name in args.field.split(",") if name.strip())
    result = run_classify(ClassifyRequest(
        config=args.config, input=args.input, out=args.out, fields=fields or ("text",), labels_field=args.labels_field,
        run_dir=args.run_dir, overrides=tuple(args.overrides),
    ))
    # Like the other commands, through rich; plain text as written (no markup, emoji codes, colouring or re-wrapping).
    Console(soft_wrap=True).print("\n".join(summary_lines(result)), markup=False, highlight=False, emoji=False)
    return 0
