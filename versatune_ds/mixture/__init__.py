"""The mixture: update rules (pure numpy), the train-time weight policy, reference losses, the sampler."""
