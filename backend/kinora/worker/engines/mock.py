"""A mock of the OpenAI videos API: a job id, queued → in_progress with progress → completed.

Jobs live in Redis, so any worker process (or a worker restarted after a crash) can
retrieve a job another one created, as with the real service. A job id also carries
what its state is computed from (creation time, length, size, scenario), so a job
outlives even a Redis that lost its data, as a real model job outlives ours. A job's state is a
function of the time since it was created: one update every `step_seconds`
(queued, then in_progress at 0, 20, 40, 60, 80 %, then completed), about 12 s
at the default of 2 s. The content is a real H.264 MP4 of the requested size and
length.

Prompts starting with a scenario tag drive the failure paths (README, How it works):
`[mock:transient]` (the first create of that prompt fails with a transient
error), `[mock:policy]` (refused for content policy), `[mock:stall]` (never
finishes).
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from pathlib import Path
from typing import cast

import redis

from kinora.core.config import get_settings
from kinora.streaming.logger import sync_client
from kinora.worker.engines.base import EngineError, ModelJob, TransientEngineError
from kinora.worker.media import render_test_pattern

log = logging.getLogger(__name__)

UPDATES = 5  # in_progress updates before completion
JOB_TTL_SECONDS = 7 * 86400
CREATES_KEY = "mock:creates"  # how many jobs were ever created: tests count paid jobs


def job_key(job_id: str) -> str:
    return f"mock:job:{job_id}"


def from_job_id(job_id: str) -> dict[bytes, bytes]:
    """A job's fields rebuilt from its id (the prompt, used only as the picture's
    seed, becomes the id); empty for an id this mock never made."""
    parts = job_id.split("_")
    if len(parts) != 7 or parts[:2] != ["video", "mock"]:
        return {}
    _, _, created, seconds, size, scenario, _ = parts
    try:
        return {
            b"created": repr(int(created, 16) / 1000).encode(),
            b"seconds": str(int(seconds)).encode(),
            b"size": size.encode(),
            b"prompt": job_id.encode(),
            b"scenario": b"" if scenario == "none" else scenario.encode(),
        }
    except ValueError:
        return {}


def prompt_digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


def prompt_key(prompt: str) -> str:
    return "mock:prompt:" + prompt_digest(prompt)


class MockEngine:
    def __init__(self, *, step_seconds: float, client: redis.Redis | None = None) -> None:
        self.step_seconds = step_seconds
        self._client = client

    @property
    def redis(self) -> redis.Redis:
        return self._client or sync_client(get_settings().required_redis_url)

    def create(
        self, *, prompt: str, seconds: int, size: str, reference: bytes | None = None
    ) -> ModelJob:
        if prompt.startswith("[mock:transient]"):
            marker = "mock:transient:" + hashlib.sha256(prompt.encode()).hexdigest()
            if self.redis.set(marker, 1, nx=True, ex=JOB_TTL_SECONDS):
                raise TransientEngineError(
                    "the model service is temporarily unavailable (mock)", code="server_error"
                )
        scenario = prompt.split("]", 1)[0][6:] if prompt.startswith("[mock:") else ""
        created = time.time()
        stamp = f"{int(created * 1000):x}"
        job_id = f"video_mock_{stamp}_{seconds}_{size}_{scenario or 'none'}_{uuid.uuid4().hex[:16]}"
        pipe = self.redis.pipeline()
        pipe.hset(
            job_key(job_id),
            mapping={
                "created": repr(created),
                "seconds": seconds,
                "size": size,
                "prompt": prompt,
                "scenario": scenario,
                "reference": int(reference is not None),
            },
        )
        pipe.expire(job_key(job_id), JOB_TTL_SECONDS)
        pipe.zadd(prompt_key(prompt), {job_id: time.time()})
        pipe.expire(prompt_key(prompt), JOB_TTL_SECONDS)
        pipe.incr(CREATES_KEY)
        pipe.execute()
        # What a paid create is: the fault suite counts these lines per prompt, which
        # survive a Redis that loses its data (tests/faults/chaos.py).
        log.info("mock model job %s created for prompt %s", job_id, prompt_digest(prompt))
        return ModelJob(id=job_id, status="queued", progress=0, poll_after=self.step_seconds)

    def find(self, *, prompt: str, seconds: int, size: str, since: float) -> list[ModelJob]:
        found = cast(list[bytes], self.redis.zrangebyscore(prompt_key(prompt), since, "+inf"))
        alike = []
        for raw in found:
            fields = self._fields(raw.decode())
            if (
                fields.get(b"seconds") == str(seconds).encode()
                and fields.get(b"size") == size.encode()
            ):
                alike.append(self.retrieve(raw.decode()))
        return alike

    def _fields(self, job_id: str) -> dict[bytes, bytes]:
        fields = cast(dict[bytes, bytes], self.redis.hgetall(job_key(job_id)))
        return fields or from_job_id(job_id)

    def retrieve(self, job_id: str) -> ModelJob:
        fields = self._fields(job_id)
        if not fields:
            raise EngineError(f"video job {job_id} not found", code="not_found")
        created = float(fields[b"created"])
        scenario = fields[b"scenario"].decode()
        ticks = int((time.time() - created) / self.step_seconds) if self.step_seconds > 0 else 99
        hint = self.step_seconds
        if ticks < 1:
            return ModelJob(id=job_id, status="queued", progress=0, poll_after=hint)
        if scenario == "policy":
            return ModelJob(
                id=job_id,
                status="failed",
                error_code="moderation_blocked",
                error_message="Your request was blocked by our moderation system (mock).",
            )
        if scenario == "stall":
            return ModelJob(id=job_id, status="in_progress", progress=40, poll_after=hint)
        if ticks <= UPDATES:
            progress = (ticks - 1) * 100 // UPDATES
            return ModelJob(id=job_id, status="in_progress", progress=progress, poll_after=hint)
        return ModelJob(id=job_id, status="completed", progress=100)

    def download(self, job_id: str, dest: Path) -> None:
        job = self.retrieve(job_id)
        if job.status != "completed":
            raise EngineError(
                f"video job {job_id} is {job.status}, not completed", code="not_ready"
            )
        fields = self._fields(job_id)
        width, height = (int(v) for v in fields[b"size"].decode().split("x"))
        render_test_pattern(
            dest,
            width=width,
            height=height,
            seconds=int(fields[b"seconds"]),
            seed=fields[b"prompt"].decode(),
        )
