"""`edgesep` commands for the compile stage, registered on the main typer app by `edgesep.cli`."""

from __future__ import annotations

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""
