"""CLI commands of issue 16."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `farm` app."""
