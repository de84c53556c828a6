"""YAML presets and recipes shipped with wsss-bench (read with importlib.resources)."""
