"""The optional reference image as submitted: fetched with limits and checked by its
first bytes. Pillow's part (resizing it to the video) runs only in the worker
(`kinora.worker.reference`), so the API checks a data: URL without loading Pillow."""

from __future__ import annotations

import base64
import binascii

from kinora.core import egress
from kinora.core.config import get_settings
from kinora.jobs.errors import EngineError

MAX_BYTES = 10 * 1024 * 1024
FETCH_SECONDS = 15.0  # the whole fetch, redirects included


class BadReference(EngineError):
    """The reference image cannot be used; retrying will not help."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_reference_image")


def load(url: str) -> bytes:
    """The image's bytes, from a data: URL or an http(s) URL (through the egress guard:
    public addresses only unless REFERENCE_ALLOW_PRIVATE), at most MAX_BYTES."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise BadReference("data: URL must be base64-encoded (data:image/png;base64,...)")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadReference("data: URL is not valid base64") from None
        if len(data) > MAX_BYTES:
            raise BadReference(f"reference image is larger than {MAX_BYTES // 2**20} MB")
        return data
    try:
        answer = egress.fetch(
            "GET", url, allow_private=get_settings().reference_allow_private,
            timeout=FETCH_SECONDS, max_bytes=MAX_BYTES, follow_redirects=True,
        )  # fmt: skip
    except egress.Refused as exc:
        raise BadReference(f"reference image URL refused: {exc}") from None
    except egress.Unreachable as exc:
        raise BadReference(f"reference image URL unreachable: {exc}") from None
    if answer.status_code != 200:
        raise BadReference("reference image URL unreachable: it did not answer with the image")
    return answer.content


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def check(data: bytes) -> None:
    """A quick look at the first bytes: PNG or JPEG, or BadReference."""
    if not data.startswith((PNG_MAGIC, JPEG_MAGIC)):
        raise BadReference("reference image must be a PNG or JPEG file")
