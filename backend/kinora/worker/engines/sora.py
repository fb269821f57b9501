"""OpenAI's videos API (Sora 2) through the official `openai` SDK.

OPENAI_BASE_URL points it at any server that speaks that API. The create call is
never retried by the SDK (`max_retries=0`): a blind retry of a paid create can start
a second paid video. Our own retries come back through `find`, which looks for the
job an unanswered create may have started before creating another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, cast

import openai
from openai.types import Video

from kinora.worker.engines.base import EngineError, ModelJob, PolicyRefusal, TransientEngineError

# The server's hint for the next poll (the same one the SDK's create_and_poll reads).
POLL_AFTER_HEADER = "openai-poll-after-ms"
DEFAULT_POLL_SECONDS = 5.0
FIND_WINDOW = 50  # recent jobs searched for an unanswered create
POLICY_CODES = {"moderation_blocked", "content_policy_violation", "content_filter"}


def _translate(exc: openai.OpenAIError) -> EngineError:
    """An SDK error as ours: transient (worth a retry) or final."""
    if isinstance(exc, openai.APITimeoutError | openai.APIConnectionError):
        return TransientEngineError(f"the video API did not answer: {exc}", code="network")
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        error = body.get("error", body) if isinstance(body, dict) else {}
        code = str(error.get("code") or error.get("type") or f"http_{exc.status_code}")
        message = str(error.get("message") or exc.message)
        if exc.status_code == 429 or exc.status_code >= 500:
            return TransientEngineError(
                f"the video API said {exc.status_code}: {message}", code=code
            )
        if code in POLICY_CODES:
            return PolicyRefusal(message, code=code)
        return EngineError(f"the video API refused the request: {message}", code=code)
    return EngineError(str(exc), code="openai_error")


def _job(video: Video, headers: Any = None) -> ModelJob:
    poll_after = None
    if headers is not None and headers.get(POLL_AFTER_HEADER):
        poll_after = int(headers[POLL_AFTER_HEADER]) / 1000
    return ModelJob(
        id=video.id,
        status=video.status,
        progress=int(video.progress or 0),
        error_code=video.error.code if video.error else None,
        error_message=video.error.message if video.error else None,
        poll_after=poll_after or DEFAULT_POLL_SECONDS,
    )


def _mime(data: bytes) -> str:
    return "image/jpeg" if data[:3] == b"\xff\xd8\xff" else "image/png"


class SoraEngine:
    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        model: str = "sora-2",
        timeout: float = 60.0,
    ) -> None:
        self.model = model
        # Reads (retrieve, list, download) may be retried by the SDK; create never is.
        self.client = openai.OpenAI(
            api_key=api_key, base_url=base_url, timeout=timeout, max_retries=2
        )
        self.create_client = self.client.with_options(max_retries=0)

    def create(
        self, *, prompt: str, seconds: int, size: str, reference: bytes | None = None
    ) -> ModelJob:
        extra: dict[str, Any] = {}
        if reference is not None:
            name = "reference.jpg" if _mime(reference) == "image/jpeg" else "reference.png"
            extra["input_reference"] = (name, reference, _mime(reference))
        try:
            raw = self.create_client.videos.with_raw_response.create(
                prompt=prompt,
                model=self.model,
                seconds=cast(Literal["4", "8", "12"], str(seconds)),
                size=cast(Literal["1280x720", "720x1280"], size),
                **extra,
            )
        except openai.OpenAIError as exc:
            raise _translate(exc) from exc
        return _job(raw.parse(), raw.headers)

    def retrieve(self, job_id: str) -> ModelJob:
        try:
            raw = self.client.videos.with_raw_response.retrieve(job_id)
        except openai.OpenAIError as exc:
            raise _translate(exc) from exc
        return _job(raw.parse(), raw.headers)

    def find(self, *, prompt: str, seconds: int, size: str, since: float) -> list[ModelJob]:
        try:
            page = self.client.videos.list(order="desc", limit=FIND_WINDOW)
        except openai.OpenAIError as exc:
            raise _translate(exc) from exc
        return [
            _job(video)
            for video in page.data
            if video.prompt == prompt
            and video.created_at >= since
            and str(video.seconds) == str(seconds)
            and video.size == size
            and video.model == self.model
        ]

    def close(self) -> None:
        """Close the client's connections (the worker's engine lives as long as it)."""
        self.client.close()

    def download(self, job_id: str, dest: Path) -> None:
        try:
            with self.client.videos.with_streaming_response.download_content(
                job_id, variant="video"
            ) as response:
                response.stream_to_file(dest)
        except openai.OpenAIError as exc:
            raise _translate(exc) from exc
