"""The gateway: the Starlette app, its routes, the turn lifecycle, and the CLI."""

from gateway.app import create_app
from gateway.ops.settings import Settings

__all__ = ["Settings", "create_app"]
