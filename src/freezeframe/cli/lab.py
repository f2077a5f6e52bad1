"""``freezeframe lab``: the built-in lab VM (placeholder until the lab lands)."""

from __future__ import annotations

import typer

app = typer.Typer(help="The built-in lab VM: a real guest running the real qemu-guest-agent.")
