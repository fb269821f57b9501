"""The optional reference image as submitted: fetched with limits and checked by its
first bytes. Pillow's part (resizing it to the video) runs only in the worker
(`kinora.worker.reference`), so the API checks a data: URL without loading Pillow."""

from __future__ import annotations

import base64
import binascii

import httpx

from kinora.jobs.errors import EngineError

MAX_BYTES = 10 * 1024 * 1024
FETCH_TIMEOUT = httpx.Timeout(10.0, connect=5.0)


class BadReference(EngineError):
    """The reference image cannot be used; retrying will not help."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_reference_image")


def load(url: str) -> bytes:
    """The image's bytes, from a data: URL or an http(s) URL, at most MAX_BYTES."""
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
        with (
            httpx.Client(timeout=FETCH_TIMEOUT, follow_redirects=True) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise BadReference(f"fetching the reference image gave HTTP {response.status_code}")
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_BYTES:
                    raise BadReference(f"reference image is larger than {MAX_BYTES // 2**20} MB")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise BadReference(f"could not fetch the reference image: {exc}") from None
    return b"".join(chunks)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def check(data: bytes) -> None:
    """A quick look at the first bytes: PNG or JPEG, or BadReference."""
    if not data.startswith((PNG_MAGIC, JPEG_MAGIC)):
        raise BadReference("reference image must be a PNG or JPEG file")
