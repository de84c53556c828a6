"""Single pipeline steps (filled in by the sub-category work)."""
from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    """Add the step commands to the group."""
