"""Pretraining with DeepSpeed: typed config, generated DeepSpeed JSON, the loop, checkpoints, metrics."""
