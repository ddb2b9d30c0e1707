"""Hugging Face safetensors checkpoints <-> jaxmodels parameter trees (load, FP8 dequant, export)."""
