from __future__ import annotations

import logging

import numpy as np

from versatune_ds.domains import Domains
from versatune_ds.train import warn_starved_domains


def test_a_domain_that_rounds_to_no_row_per_block_is_named(caplog) -> None:
    domains = Domains(("law", "code", "general"))
    with caplog.at_level(logging.WARNING, logger="versatune_ds.train"):
        warn_starved_domains(np.array([0.96, 0.024, 0.016]), 16, domains)
    assert "general" in caplog.text and "law" not in caplog.text
    assert "at least 63" in caplog.text


def test_no_warning_when_every_weighted_domain_gets_rows(caplog) -> None:
    domains = Domains(("law", "code", "general"))
    with caplog.at_level(logging.WARNING, logger="versatune_ds.train"):
        warn_starved_domains(np.array([0.5, 0.3, 0.2]), 16, domains)
        warn_starved_domains(np.array([0.9, 0.1, 0.0]), 16, domains)  # a zero weight is a choice, not starvation
    assert caplog.text == ""
