"""The `kinora` command (README, the top)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kinora.core.config import get_settings

if TYPE_CHECKING:
    from kinora.cli.client import KinoraClient


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kinora")
def main() -> None:
    """Kinora: run AI video generation jobs and watch them happen live."""
    from kinora.core import logs

    settings = get_settings()
    logs.configure(settings.log_format, settings.log_level)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the API listens on.")
@click.option("--port", default=8000, show_default=True, help="Port the API listens on.")
@click.option("--workers", default=1, show_default=True, help="Celery worker processes.")
def up(host: str, port: int, workers: int) -> None:
    """Start everything: Redis (embedded unless REDIS_URL is set), migrations, the
    demo user, a worker and the API. Ctrl-C stops it all."""
    from kinora.cli.supervisor import run_all

    sys.exit(run_all(host=host, port=port, workers=workers))


# A burst of new streams (a reconnect storm) waits in the kernel's queues while the
# API is busy; a connection that waits there too long is reset (bench.burst). uvicorn
# asks for 2,048; the kernel caps it at net.core.somaxconn (4,096 by default since
# Linux 5.4), so asking for more takes whatever the machine allows.
LISTEN_BACKLOG = 65535


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--workers", default=1, show_default=True, help="API processes sharing the port.")
@click.option(
    "--backlog",
    default=LISTEN_BACKLOG,
    show_default=True,
    help="Connections the kernel holds until the API accepts them (capped by the "
    "kernel's net.core.somaxconn).",
)
def api(host: str, port: int, workers: int, backlog: int) -> None:
    """Run the API under uvicorn (needs REDIS_URL)."""
    import uvicorn

    settings = get_settings()
    redis_url(settings)  # fail early with a clear message
    share_metrics(settings.var_dir / "metrics" / f"api-{socket.gethostname()}-{port}")
    uvicorn.run(
        "kinora.api.app:serve",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        # Logging is Kinora's (create_app configures it in every worker process).
        log_config=None,
        # Streams end promptly on shutdown: their generators exit on cancellation.
        timeout_graceful_shutdown=3,
        backlog=backlog,
    )


@main.command()
@click.option("--concurrency", default=1, show_default=True, help="Tasks run at once.")
@click.option(
    "--metrics-port", default=0, show_default=True,
    help="Serve this worker's Prometheus metrics on this port (0: off).",
)  # fmt: skip
@click.option(
    "--webhooks", is_flag=True,
    help="Deliver webhooks (their own queue, many at once in threads) instead of videos.",
)  # fmt: skip
@click.option("--quiet", is_flag=True, hidden=True, help="No banner (kinora up).")
def worker(concurrency: int, metrics_port: int, webhooks: bool, quiet: bool) -> None:
    """Run a Celery worker for the generation tasks (needs REDIS_URL)."""
    settings = get_settings()
    redis_url(settings)
    share_metrics(settings.var_dir / "metrics" / f"worker-{socket.gethostname()}-{os.getpid()}")
    if metrics_port:
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        start_http_server(metrics_port, registry=registry)
    from kinora.jobs.dispatch import QUEUE, WEBHOOK_QUEUE
    from kinora.worker.celery_app import app

    if webhooks:  # waiting on receivers: threads, a slow one holds up nothing else
        queue = ["-Q", WEBHOOK_QUEUE, "--pool", "threads", "--concurrency", str(8 * concurrency)]
        queue += ["--hostname", "webhooks@%h"]
    else:
        queue = ["-Q", QUEUE, "--concurrency", str(concurrency)]
    app.worker_main(["--quiet"] * quiet + ["worker", "--loglevel", "INFO", *queue])


def redis_url(settings: Any) -> str:
    """REDIS_URL, when it is set and of a form Kinora knows (README, Redis topologies);
    else a one-line error that says what to set."""
    from kinora.streaming.connect import topology

    try:
        url: str = settings.required_redis_url
        if topology(url).cluster and not settings.broker_url:
            raise ValueError(
                "REDIS_URL is a Redis Cluster, which carries the events but cannot be "
                "Celery's broker: set BROKER_URL to a Redis server (or a Sentinel URL)"
            )
        if settings.broker_url and topology(settings.broker_url).cluster:
            raise ValueError(
                "BROKER_URL is a Redis Cluster, which Celery cannot use: set it to a "
                "Redis server (redis://) or a Sentinel URL (redis+sentinel://)"
            )
    except (RuntimeError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    return url


def share_metrics(default: Path) -> None:
    """Metric files shared by this process and the ones it starts (uvicorn's and
    Celery's), so one scrape sees them all (kinora.core.metrics). An operator's
    PROMETHEUS_MULTIPROC_DIR wins; `kinora up` sets one for all its children. It must
    be set before prometheus_client is imported, which is why it is done here."""
    from kinora.core.config import metrics_dir, share_metrics_dir

    given = metrics_dir()
    directory = Path(given or default)
    if given is None:
        # Our own directory: the files of an earlier run are not ours to add up.
        shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    share_metrics_dir(directory)


@main.group()
def db() -> None:
    """The database schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply every Alembic migration not yet applied."""
    from kinora.core.db import upgrade

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
    from kinora.core.db import upgrade
    from kinora.jobs.accounts import DuplicateUser, create_user

    upgrade()
    try:
        _user, token = create_user(email, credits=credit_amount, plan=plan)
    except DuplicateUser as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Created {email} ({plan}, {credit_amount} credits). API token:")
    click.echo(token)


@users.command("rotate-token")
@click.argument("email")
def users_rotate_token(email: str) -> None:
    """Revoke the user's API token and give them a new one (printed as the last line).
    Every video URL signed before now stops working, and every open stream of theirs
    ends within seconds."""
    from kinora.core.db import upgrade
    from kinora.jobs.accounts import rotate_token

    upgrade()
    token = rotate_token(email)
    if token is None:
        raise click.ClickException(f"no user {email}: `kinora users create {email}` makes one")
    click.echo(f"Revoked {email}'s API token and every URL signed with it. New API token:")
    click.echo(token)


def _client(url: str, token: str | None) -> KinoraClient:
    from kinora.cli.client import KinoraClient, check_url

    if not token:
        raise click.UsageError("no API token: pass --token or set KINORA_TOKEN")
    try:
        return KinoraClient(check_url(url), token)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--url / KINORA_URL") from None


class CannotReach(click.ClickException):
    exit_code = 4  # terminal.EXIT_UNREACHABLE


class NotAllowedHere(click.ClickException):
    exit_code = 5  # terminal.EXIT_NOT_ALLOWED


def failure(error: Exception) -> click.ClickException:
    """A refusal or an unreachable server, with the exit code that says which."""
    from kinora.cli.client import NotAllowed, Unreachable

    if isinstance(error, Unreachable):
        return CannotReach(str(error))
    if isinstance(error, NotAllowed):
        return NotAllowedHere(str(error))
    return click.ClickException(str(error))


server_options = [
    click.option(
        "--url", envvar="KINORA_URL", default="http://127.0.0.1:8000", show_default=True,
        help="The Kinora API (or KINORA_URL).",
    ),
    click.option("--token", envvar="KINORA_TOKEN", help="Your API token (or KINORA_TOKEN)."),
]  # fmt: skip


def with_server(func: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(server_options):
        func = option(func)
    return func


@main.command()
@click.argument("prompt")
@click.option("--seconds", type=click.Choice(["4", "8", "12"]), default="4", show_default=True)
@click.option(
    "--size", type=click.Choice(["1280x720", "720x1280"]), default="1280x720", show_default=True
)
@click.option("--image-url", help="An http(s) or data: URL of a PNG/JPEG reference image.")
@click.option("--watch/--no-watch", "follow", default=False, help="Follow it to the end.")
@with_server
def generate(
    prompt: str,
    seconds: str,
    size: str,
    image_url: str | None,
    follow: bool,
    url: str,
    token: str | None,
) -> None:
    """Submit a video; with --watch, follow it like `kinora watch`."""
    from kinora.cli.client import ClientError

    client = _client(url, token)
    try:
        body = {"prompt": prompt, "seconds": int(seconds), "size": size, "image_url": image_url}
        created = client.submit({k: v for k, v in body.items() if v is not None})
        click.echo(
            f"Video {created['video_id']} queued ({created['credits_remaining']} credits left)"
        )
        if follow:
            sys.exit(_watch(client, created["video_id"]))
        click.echo(f"Watch it: kinora watch {created['video_id']}")
    except ClientError as exc:
        raise failure(exc) from exc
    finally:
        client.close()


@main.command("watch")
@click.argument("video_id", type=int)
@with_server
def watch_command(video_id: int, url: str, token: str | None) -> None:
    """Follow a video's progress in the terminal. Exits 0 when it completes, 1 if it
    failed, 3 if it was cancelled, 4 if the server cannot be reached, 5 if the token or
    the video is not good (2: a usage error)."""
    from kinora.cli.client import ClientError

    client = _client(url, token)
    try:
        sys.exit(_watch(client, video_id))
    except ClientError as exc:
        raise failure(exc) from exc
    finally:
        client.close()


def _watch(client: KinoraClient, video_id: int) -> int:
    from kinora.cli.terminal import watch

    try:
        return watch(client, video_id)
    except KeyboardInterrupt:
        return 130
