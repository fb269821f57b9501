"""The cursor of a many-jobs stream (docs/protocol.md §6): the SSE `id:` of each of its
events says where the stream stands in every job at once, so the `Last-Event-ID` a
client sends back resumes them all.

`7:12,9:3` is "job 7 up to seq 12, job 9 up to seq 3" (ids percent-encoded, so any id
fits); `new:5` is where the stream stands in the announcements of jobs submitted while
it is open (Kinora's "all my videos" stream).
"""

from __future__ import annotations

from urllib.parse import quote, unquote

from fastapi import HTTPException, status

NEW = "new"
# Longest cursor accepted: 50 jobs with ids of up to 255 characters, encoded.
MAX_LENGTH = 50 * (3 * 255 + 21)


def token(job_id: str | int) -> str:
    """A job's name in a cursor."""
    return quote(str(job_id), safe="")


def parse(value: str | None) -> dict[str, int]:
    """The positions a client sends back (its `Last-Event-ID`), by job token; {} for
    none. A `400` that says what to send when it is not a cursor."""
    if value is None or not value.strip():
        return {}
    text = value.strip()
    positions: dict[str, int] = {}
    try:
        if len(text) > MAX_LENGTH:
            raise ValueError
        for entry in text.split(","):
            name, _, seq = entry.rpartition(":")
            if not name or not (seq.isascii() and seq.isdigit()) or len(seq) > 18:
                raise ValueError
            unquote(name, errors="strict")
            positions[name] = int(seq)
    except (ValueError, UnicodeDecodeError):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            detail=f"malformed Last-Event-ID {value[:80]!r}: send the `id:` of the last "
            "event this stream sent",
        ) from None
    return positions


def encode(positions: dict[str, int]) -> bytes:
    return ",".join(f"{name}:{seq}" for name, seq in positions.items()).encode()
