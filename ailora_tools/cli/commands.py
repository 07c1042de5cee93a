"""Every command, registered on the `main` group."""

from . import adapters, analysis, pipeline, servers  # noqa: F401  (the commands register on `main`)
from .app import main

__all__ = ["main"]
