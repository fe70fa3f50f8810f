"""The engine: one model loader, the DeepSpeed training engine, losses, DeepSpeed config, checkpoints, export."""
