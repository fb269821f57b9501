"""Writing and reading MP4 files with PyAV (FFmpeg's libraries, no ffmpeg binary)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import av
import numpy as np


def render_test_pattern(
    dest: Path, *, width: int, height: int, seconds: int, seed: str, fps: int = 24
) -> None:
    """A playable H.264 MP4 of a moving test pattern, `width`x`height`, `seconds` long.

    Written to a temporary name and renamed, so `dest` is either whole or absent.
    """
    digest = hashlib.sha256(seed.encode()).digest()
    base_color = np.array(list(digest[:3]), dtype=np.uint8)
    tmp = dest.with_suffix(".part.mp4")
    ys = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    with av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "movflags": "+faststart"}
        frame_rgb = np.empty((height, width, 3), dtype=np.uint8)
        bar = max(8, width // 16)
        for i in range(seconds * fps):
            frame_rgb[:] = base_color
            frame_rgb[:, :, 1] = ys  # vertical gradient
            x = (i * width // (fps * 2)) % max(1, width - bar)
            frame_rgb[:, x : x + bar] = 255  # a bar sweeping across every 2 s
            frame = av.VideoFrame.from_ndarray(frame_rgb, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    tmp.replace(dest)


def write_thumbnail(video: Path, dest: Path, *, max_width: int = 480) -> None:
    """A JPEG of the video's first frame, at most `max_width` wide."""
    with av.open(str(video)) as container:
        frame = next(container.decode(video=0))
        image = frame.to_image()  # type: ignore[no-untyped-call]
    image.thumbnail((max_width, max_width))
    tmp = dest.with_suffix(".part.jpg")
    image.save(tmp, "JPEG", quality=85)
    tmp.replace(dest)


def probe(video: Path) -> tuple[int, int, float, str]:
    """(width, height, duration in seconds, codec) of an MP4, decoding its first frame."""
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        next(container.decode(video=0))
        duration = float(container.duration or 0) / 1_000_000
        return (
            stream.codec_context.width,
            stream.codec_context.height,
            duration,
            stream.codec_context.name,
        )
