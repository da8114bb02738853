"""``turngate serve --reload``: uvicorn's reloader, for adapter and frontend development.

The reloader process watches the project's packages (``gateway``,
``persistence``, ``llm_adapters``, ``turngate``: the source tree of an editable
install), the package of every installed adapter (entry point group
``turngate.adapters``) and any ``--reload-dir``; on a change it starts a new
worker process that builds the app again from the environment.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from importlib.metadata import entry_points

import uvicorn
from starlette.applications import Starlette

from llm_adapters.registry import ENTRY_POINT_GROUP

PROJECT_PACKAGES = ("gateway", "persistence", "llm_adapters", "turngate")


def _module_dir(module: str) -> str | None:
    """The directory to watch for ``module``: its package, or the directory of a
    single-module distribution unless that is a shared ``site-packages``."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None
    if spec.submodule_search_locations:  # a package
        return os.path.dirname(spec.origin)
    parent = os.path.dirname(spec.origin)
    if os.path.basename(parent) in ("site-packages", "dist-packages"):
        return None  # watching all installed packages would restart on any pip install
    return parent


def reload_dirs(extra: Iterable[str] = ()) -> list[str]:
    """The directories ``serve --reload`` watches, sorted, without duplicates."""
    dirs: set[str] = set()
    for package in PROJECT_PACKAGES:
        if (found := _module_dir(package)) is not None:
            dirs.add(found)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if (found := _module_dir(ep.value.partition(":")[0].split(".")[0])) is not None:
            dirs.add(found)
    for directory in extra:
        if not os.path.isdir(directory):
            raise ValueError(f"--reload-dir {directory!r} is not a directory; expected one "
                             "to watch")
        dirs.add(os.path.abspath(directory))
    return sorted(os.path.realpath(d) for d in dirs)


def create_worker_app() -> Starlette:
    """The app of one reloader worker: settings from the environment, logging as
    ``serve`` configures it (a worker is a fresh process)."""
    from gateway.app import create_app
    from gateway.ops.logs import configure_logging
    from gateway.ops.settings import Settings

    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    return create_app(settings)


def serve_reload(host: str, port: int, extra_dirs: Iterable[str] = ()) -> None:
    """Run the gateway under uvicorn's reloader until interrupted.

    Each worker builds the app with :func:`create_worker_app` from the
    environment (the ``.env`` file already loaded by the caller is inherited).
    """
    uvicorn.run(
        "gateway.ops.devserver:create_worker_app",
        factory=True,
        host=host,
        port=port,
        reload=True,
        reload_dirs=reload_dirs(extra_dirs),
        reload_includes=["*.py", "*.html", "*.js", "*.css"],
        http="httptools",
        lifespan="on",
        log_config=None,
    )


__all__ = ["PROJECT_PACKAGES", "create_worker_app", "reload_dirs", "serve_reload"]
