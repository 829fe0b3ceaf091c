"""Registered presets of the paper's models (filled in by the model-zoo work)."""
