"""Evaluation: per-domain held-out loss with standard errors, multiple-choice scoring, the paper's statistics."""
