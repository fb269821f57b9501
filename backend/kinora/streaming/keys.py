"""Which job a stream is about, and where its events live in Redis.

A stream belongs to one job: any Celery task's (`job`, its id a string or an integer)
or one of Kinora's videos (`video`). The kind names the Redis keys and the channel
(`video:7`, `{video:7}:events`, …) and the id field of every event (`video_id`, or
`job_id` for any other job), so the same machinery serves both.

A job's keys carry its channel as their hash tag (`{video:7}:seq`): on a Redis Cluster
they and the channel hash to one slot, so the publishing script runs on one shard and
publishes there (SPUBLISH). Braces in a job's id would change what is hashed, so an id
may not have them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StreamKey:
    kind: str
    id: str | int

    def __post_init__(self) -> None:
        if isinstance(self.id, str) and ("{" in self.id or "}" in self.id):
            raise ValueError(
                f"a job's id may not contain braces ({self.id!r}): Redis Cluster reads them "
                "as a hash tag. Use letters, digits, '-', '_', ':' or '.'"
            )

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}"

    @property
    def channel(self) -> str:
        return str(self)

    @property
    def history(self) -> str:
        """A sorted set of the job's events, scored by seq."""
        return f"{{{self}}}:events"

    @property
    def seq(self) -> str:
        """The job's event counter."""
        return f"{{{self}}}:seq"

    @property
    def end(self) -> str:
        """Set (to its seq) when the job's `complete` is published: nothing follows it."""
        return f"{{{self}}}:end"

    @property
    def sent(self) -> str:
        """Each published event's unique id, scored by its seq: a resend is not a second
        event. A sorted set trimmed to the history's cap (README, Faults: every structure of
        a job is bounded like its history). The name is new: before, `:sent` was a hash
        that grew with every event; old ones expire with their retention."""
        return f"{{{self}}}:uids"

    @property
    def presence(self) -> str:
        """Live watchers per API process."""
        return f"presence:{self}"

    @property
    def id_field(self) -> str:
        """The name of the job's id in its events: `video_id`, `job_id`."""
        return f"{self.kind}_id"


def of(kind: str, job_id: str | int) -> StreamKey:
    """The stream of a job of `kind`. A video's id is an integer, whether it was given as
    7 or "7", so `SSELogger("7")` and `GET /api/v1/videos/7/stream` meet on `video:7`."""
    if kind == "video" and not isinstance(job_id, int):
        if not (job_id.isascii() and job_id.isdigit()):
            raise ValueError(
                f"a video's id is an integer, not {job_id!r}: for another kind of job, "
                'name it (SSELogger(job_id, kind="job"))'
            )
        job_id = int(job_id)
    return StreamKey(kind, job_id)


def job(job_id: str | int) -> StreamKey:
    """Any job's stream, by its id (a Celery task's id, say)."""
    return StreamKey("job", job_id)


def video(video_id: int) -> StreamKey:
    """One of Kinora's videos."""
    return StreamKey("video", video_id)
