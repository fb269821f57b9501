"""What `kinora watch` shows: a progress bar, the step lines with their times, and the
finished video's URL. Exit codes (EXIT): 0 completed, 1 failed, 3 cancelled,
4 the server cannot be reached, 5 not allowed (token or video); click's own 2 is a
usage error (a bad --url among them)."""

from __future__ import annotations

from datetime import datetime

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from kinora.cli.client import KinoraClient
from kinora.streaming.events import Event

EXIT_CODES = {"completed": 0, "failed": 1, "cancelled": 3}
EXIT_UNREACHABLE = 4
EXIT_NOT_ALLOWED = 5


def line(event: Event) -> str:
    when = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).astimezone()
    step = f"step {event['step']}" if "step" in event else event["type"]
    progress = f"{event['progress']:>3}%" if "progress" in event else "    "
    text = escape(event["message"])
    if event["type"] == "error":
        code = escape(event.get("error_code", ""))
        if event.get("is_retryable"):
            attempt = f"attempt {event.get('retry_count', 0) + 1}/{event.get('max_retries', 0) + 1}"
            wait = event.get("retry_in_seconds")
            retry = f", retrying in {wait:g} s" if wait is not None else ", will retry"
            text = f"[red]{text}[/red] [dim]{code}, {attempt}{retry}[/dim]"
        else:
            text = f"[red]{text}[/red] [dim]{code}, final[/dim]"
    return f"[dim]{when:%H:%M:%S} #{event['seq']:<3}[/dim] {step:<8} {progress} {text}"


def watch(client: KinoraClient, video_id: int, console: Console | None = None) -> int:
    console = console or Console()
    final: Event | None = None
    columns = (
        TextColumn("[bold]video {task.fields[video_id]}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("connecting...", total=100, video_id=video_id)
        for event in client.events(video_id):
            console.print(line(event), highlight=False, soft_wrap=True)
            bar.update(task, completed=event.get("progress"), description=event["message"][:60])
            if event["type"] == "complete":
                final = event
    if final is None:  # the stream had ended before we came: ask for the outcome
        video = client.video(video_id)
        status, url = video["status"], video.get("video_url")
    else:
        status = final.get("status", "failed")
        url = final.get("video_url")
        if url and url.startswith("/"):
            url = client.base_url + url
    if status == "completed":
        console.print(
            f"[green]Video {video_id} completed:[/green] {url}", highlight=False, soft_wrap=True
        )
    else:
        console.print(f"[red]Video {video_id} {status}.[/red]", highlight=False)
    return EXIT_CODES.get(status, 1)
