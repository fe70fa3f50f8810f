"""versatune_ds: multi-domain fine-tuning of causal LMs with DeepSpeed ZeRO-3 and the VersaTune method.

Importing the package does no work and imports neither torch nor deepspeed; the heavy modules are
imported by the commands that need them.
"""

__version__ = "0.1.0"
