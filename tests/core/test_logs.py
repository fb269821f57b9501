"""Log lines: the ids of the request or job on each, JSON when asked, no secrets."""

from __future__ import annotations

import io
import json
import logging

from kinora.core import logs
from kinora.core.tokens import new_api_token, sign_scoped


def capture(fmt: str) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    logger = logging.getLogger(f"kinora.test.{fmt}")
    logger.handlers[:] = [logs.make_handler(fmt, stream)]  # type: ignore[arg-type]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_json_lines_carry_the_trace_and_video_ids_set_where_the_job_starts() -> None:
    logger, stream = capture("json")
    with logs.bind(trace_id="trace-123", video_id=42):
        logger.info("step %s of video", 3)
    logger.info("outside any job")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "step 3 of video"
    assert (first["trace_id"], first["video_id"], first["level"]) == ("trace-123", 42, "INFO")
    assert second["trace_id"] is None
    assert second["video_id"] is None


def test_no_token_of_any_kind_reaches_a_log_line(environment: dict[str, str]) -> None:
    api_token = new_api_token()
    scoped = sign_scoped(7, 3)
    logger, stream = capture("text")
    logger.info("GET /api/v1/videos/7/stream?token=%s&last_event_id=5", scoped)
    logger.info("header Authorization: Bearer %s", api_token)
    logger.warning("user pasted %s into a prompt", api_token)
    try:
        raise ValueError(f"bad token {api_token}")
    except ValueError:
        logger.exception("failed")
    text = stream.getvalue()
    assert api_token not in text
    assert scoped not in text
    assert api_token[:12] not in text
    assert text.count(logs.REDACTED) == 4  # one a line, and in the traceback
    assert "last_event_id=5" in text  # only the secret goes


def test_text_lines_show_the_ids_after_the_message() -> None:
    logger, stream = capture("text")
    with logs.bind(trace_id="abc", video_id=9):
        logger.info("hello")
    assert stream.getvalue().rstrip().endswith("hello [video_id=9 trace_id=abc]")
