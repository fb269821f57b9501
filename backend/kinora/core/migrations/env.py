"""Alembic environment: the URL comes from Kinora's Settings, the schema from its models."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from kinora.core import models  # noqa: F401  (registers the tables on Base.metadata)
from kinora.core.config import get_settings
from kinora.core.db import Base, make_engine

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def url() -> str:
    return str(config.attributes.get("url") or get_settings().resolved_database_url)


def run_migrations_offline() -> None:
    context.configure(
        url=url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(url())
    with engine.connect() as connection:
        # render_as_batch: SQLite can only ALTER tables by copying them.
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
