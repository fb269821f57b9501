"""A local fake of OpenAI's videos API, for the real Sora engine's tests.

It speaks the same HTTP as the real service (multipart create, retrieve with the
`openai-poll-after-ms` hint, list, content) and can be scripted through the prompt:
`[fake:500]` (the first create answers 500 and creates nothing), `[fake:slow]` (the
first create creates the job but answers too late for the client: an unknown
outcome), `[fake:policy]` (the job fails for content policy), `[fake:stall]` (never
finishes). `GET /_stats` tells how many jobs were created, per prompt.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse

from kinora.worker.media import render_test_pattern

STEP_SECONDS = 0.2
SLOW_CREATE_SECONDS = 3.0


def create_app() -> FastAPI:
    app = FastAPI()
    jobs: dict[str, dict[str, Any]] = {}
    creates: Counter[str] = Counter()
    attempts: Counter[str] = Counter()
    references: dict[str, str] = {}
    ids = itertools.count(1)
    files = Path(tempfile.mkdtemp(prefix="fake-videos-"))

    def view(job: dict[str, Any]) -> dict[str, Any]:
        elapsed = time.time() - job["started"]
        ticks = int(elapsed / STEP_SECONDS)
        status, progress, error = "queued", 0, None
        if ticks >= 1:
            status, progress = "in_progress", min(100, (ticks - 1) * 25)
        if job["prompt"].startswith("[fake:stall]"):
            progress = min(progress, 50)
        elif job["prompt"].startswith("[fake:policy]") and ticks >= 2:
            status = "failed"
            error = {"code": "moderation_blocked", "message": "Blocked by moderation (fake)."}
        elif ticks >= 6:
            status, progress = "completed", 100
        return {
            "id": job["id"],
            "object": "video",
            "model": job["model"],
            "status": status,
            "progress": progress,
            "created_at": int(job["created_at"]),
            "completed_at": int(time.time()) if status == "completed" else None,
            "expires_at": None,
            "prompt": job["prompt"],
            "seconds": job["seconds"],
            "size": job["size"],
            "error": error,
            "remixed_from_video_id": None,
        }

    def not_found(video_id: str) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": f"Video {video_id} not found", "type": "invalid_request_error",
                       "code": "not_found", "param": None}},
            status_code=404,
        )  # fmt: skip

    @app.post("/v1/videos")
    async def create(
        request: Request,
        prompt: str = Form(),
        model: str = Form("sora-2"),
        seconds: str = Form("4"),
        size: str = Form("720x1280"),
        input_reference: UploadFile | None = None,
    ) -> Any:
        attempts[prompt] += 1
        if not request.headers.get("authorization", "").startswith("Bearer "):
            return JSONResponse({"error": {"message": "no API key"}}, status_code=401)
        if prompt.startswith("[fake:500]") and attempts[prompt] == 1:
            return JSONResponse(
                {"error": {"message": "The server had an error", "type": "server_error",
                           "code": "server_error", "param": None}},
                status_code=500,
            )  # fmt: skip
        job_id = f"video_fake_{next(ids)}"
        jobs[job_id] = {
            "id": job_id,
            "prompt": prompt,
            "model": model,
            "seconds": seconds,
            "size": size,
            "created_at": time.time(),
            "started": time.time(),
        }
        creates[prompt] += 1
        if input_reference is not None:
            data = await input_reference.read()
            references[job_id] = f"{input_reference.content_type}:{len(data)}"
        if prompt.startswith("[fake:slow]") and attempts[prompt] == 1:
            await asyncio.sleep(SLOW_CREATE_SECONDS)  # the client has given up by now
        return JSONResponse(view(jobs[job_id]), headers={"openai-poll-after-ms": "100"})

    @app.get("/v1/videos/{video_id}")
    async def retrieve(video_id: str) -> Any:
        if video_id not in jobs:
            return not_found(video_id)
        return JSONResponse(view(jobs[video_id]), headers={"openai-poll-after-ms": "100"})

    @app.get("/v1/videos")
    async def list_videos(limit: int = 20, order: str = "desc") -> Any:
        data = sorted(jobs.values(), key=lambda j: j["created_at"], reverse=order == "desc")
        page = [view(j) for j in data[:limit]]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(data) > limit,
        }

    @app.get("/v1/videos/{video_id}/content")
    async def content(video_id: str, variant: str = "video") -> Any:
        if video_id not in jobs:
            return not_found(video_id)
        job = view(jobs[video_id])
        if job["status"] != "completed":
            return JSONResponse({"error": {"message": "not ready", "code": "not_ready"}}, 409)
        path = files / f"{video_id}.mp4"
        if not path.exists():
            width, height = (int(v) for v in job["size"].split("x"))
            await asyncio.to_thread(
                render_test_pattern, path, width=width, height=height,
                seconds=int(job["seconds"]), seed=video_id,
            )  # fmt: skip
        return FileResponse(path, media_type="video/mp4")

    @app.get("/_stats")
    async def stats() -> dict[str, Any]:
        return {"creates": dict(creates), "attempts": dict(attempts), "references": references}

    return app
