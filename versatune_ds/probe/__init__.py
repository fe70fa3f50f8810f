"""The knowledge probe: generation split across ranks, domain classifiers, distribution estimators, pipeline."""
