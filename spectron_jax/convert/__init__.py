"""Converters between HF safetensors checkpoints and our parameter trees (no torch at run time)."""
