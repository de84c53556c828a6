"""The shared command options; they live in :mod:`wsss_bench.commands`, the public API that
plugin commands use too."""
from __future__ import annotations

from ..commands import config_options, resolve_config

__all__ = ["config_options", "resolve_config"]
