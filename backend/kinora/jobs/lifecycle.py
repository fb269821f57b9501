"""The shape of a video's life, each rule in one place (docs/protocol.md §1): the sizes
and lengths a video may have, its typed parameters, the steps of a generation with
the stage each belongs to and the progress each reaches, and the URL of its content.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import IntEnum
from typing import Any, Literal, get_args

from kinora.core.tokens import sign_scoped
from kinora.streaming.events import Stage

Size = Literal["1280x720", "720x1280"]
Seconds = Literal[4, 8, 12]

SIZES: tuple[Size, ...] = get_args(Size)
SECONDS: tuple[Seconds, ...] = get_args(Seconds)
DEFAULT_SIZE: Size = "1280x720"
DEFAULT_SECONDS: Seconds = 4


@dataclass(frozen=True)
class VideoParameters:
    """What was asked for, as stored with the video (its `parameters` JSON)."""

    seconds: int = DEFAULT_SECONDS
    size: str = DEFAULT_SIZE
    image_url: str | None = None

    @classmethod
    def of(cls, stored: Mapping[str, Any]) -> VideoParameters:
        return cls(
            seconds=int(stored.get("seconds", DEFAULT_SECONDS)),
            size=str(stored.get("size", DEFAULT_SIZE)),
            image_url=stored.get("image_url") or None,
        )

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def supported(self) -> bool:
        return self.size in SIZES and self.seconds in SECONDS

    @property
    def dimensions(self) -> tuple[int, int]:
        width, height = self.size.split("x")
        return int(width), int(height)


class Step(IntEnum):
    """The steps of a generation, as the `step` field of its progress events."""

    QUEUED = 0
    VALIDATING = 1
    REFERENCE_IMAGE = 2
    SUBMITTED = 3
    WAITING = 4
    PROCESSING = 5
    DOWNLOADING = 6
    SAVING = 7
    THUMBNAIL = 8
    DONE = 9

    @property
    def stage(self) -> Stage:
        if self <= Step.REFERENCE_IMAGE:
            return "preparing"
        if self <= Step.PROCESSING:
            return "generating"
        return "finalizing"


# The progress (percent) each step reaches: preparing 0-10, generating 10-85,
# finalizing 85-100. While the model works (PROCESSING), its own percentage is scaled
# into the band between WAITING and PROCESSING (`model_progress`).
PROGRESS: dict[Step, int] = {
    Step.QUEUED: 0,
    Step.VALIDATING: 3,
    Step.REFERENCE_IMAGE: 10,
    Step.SUBMITTED: 12,
    Step.WAITING: 15,
    Step.PROCESSING: 85,
    Step.DOWNLOADING: 88,
    Step.SAVING: 92,
    Step.THUMBNAIL: 96,
    Step.DONE: 100,
}
LOADING_REFERENCE = 6  # halfway through REFERENCE_IMAGE, while the image is fetched


def model_progress(percent: int) -> int:
    """The video's progress while the model reports `percent` of its own."""
    low, high = PROGRESS[Step.WAITING], PROGRESS[Step.PROCESSING]
    return low + percent * (high - low) // 100


def content_path(
    video_id: int, user_id: int, what: Literal["content", "thumbnail"] = "content"
) -> str:
    """Where the finished video (or its thumbnail) is fetched, with a token scoped to
    it: the `video_url` of the `complete` event. The worker does not know the host a
    client used; the API resolves the same path against the request (`api.urls`)."""
    return f"/api/v1/videos/{video_id}/{what}?token={sign_scoped(video_id, user_id)}"
