"""Every command, registered on the `main` group."""
from . import adapters, analysis, pipeline  # noqa: F401  (the commands register on `main`)
from .app import main

__all__ = ["main"]
