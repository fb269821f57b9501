"""The `kinora` command (CONTRACT §1)."""

from __future__ import annotations

import logging
import sys

import click

from kinora.config import get_settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kinora")
def main() -> None:
    """Kinora: run AI video generation jobs and watch them happen live."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the API listens on.")
@click.option("--port", default=8000, show_default=True, help="Port the API listens on.")
@click.option("--workers", default=1, show_default=True, help="Celery worker processes.")
def up(host: str, port: int, workers: int) -> None:
    """Start everything: Redis (embedded unless REDIS_URL is set), migrations, the
    demo user, a worker and the API. Ctrl-C stops it all."""
    from kinora.supervisor import run_all

    sys.exit(run_all(host=host, port=port, workers=workers))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
def api(host: str, port: int) -> None:
    """Run the API under uvicorn (needs REDIS_URL)."""
    import uvicorn

    get_settings().required_redis_url  # noqa: B018  (fail early with a clear message)
    uvicorn.run(
        "kinora.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        log_level="info",
        # Streams end promptly on shutdown: their generators exit on cancellation.
        timeout_graceful_shutdown=3,
    )


@main.command()
@click.option("--concurrency", default=1, show_default=True, help="Tasks run at once.")
def worker(concurrency: int) -> None:
    """Run a Celery worker for the generation tasks (needs REDIS_URL)."""
    get_settings().required_redis_url  # noqa: B018
    from kinora.celery_app import app

    app.worker_main(
        ["worker", "--loglevel", "INFO", "--concurrency", str(concurrency), "-Q", "kinora"]
    )


@main.group()
def db() -> None:
    """The database schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply every Alembic migration not yet applied."""
    from kinora.db import upgrade

    upgrade()
    click.echo("database is up to date")


@main.group()
def users() -> None:
    """User accounts."""


@users.command("create")
@click.argument("email")
@click.option(
    "--credits", "credit_amount", default=1000, show_default=True, help="Credits to grant."
)
@click.option(
    "--plan", type=click.Choice(["free", "pro"]), default="pro", show_default=True,
    help="The free plan cannot generate videos.",
)  # fmt: skip
def users_create(email: str, credit_amount: int, plan: str) -> None:
    """Create a user; prints the user's API token as the last line."""
    from kinora.accounts import DuplicateUser, create_user
    from kinora.db import upgrade

    upgrade()
    try:
        _user, token = create_user(email, credits=credit_amount, plan=plan)
    except DuplicateUser as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Created {email} ({plan}, {credit_amount} credits). API token:")
    click.echo(token)
