"""The optional reference image, resized and cropped to the video (Pillow: worker
only). Fetching and checking it is `kinora.jobs.reference`."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from kinora.jobs.reference import BadReference


def prepare(data: bytes, size: str) -> bytes:
    """A PNG of the image, resized and cropped to cover `size` (WIDTHxHEIGHT)."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ("PNG", "JPEG"):
            raise BadReference(f"reference image must be PNG or JPEG, not {image.format}")
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise BadReference("reference image is not a readable PNG or JPEG") from None
    width, height = (int(v) for v in size.split("x"))
    scale = max(width / image.width, height / image.height)
    resized = image.convert("RGB").resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    out = io.BytesIO()
    resized.crop((left, top, left + width, top + height)).save(out, "PNG")
    return out.getvalue()
