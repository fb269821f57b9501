"""The web side: upload a CSV, get a job id, watch the import live."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from tasks import BROKER_URL, STORE, import_csv

from kinora.streaming import keys, progress_router

# The imports this app started. A real app would ask its database whether the caller
# may see the job; this one lets anyone watch any import it started (or, with a store,
# any import the store knows: they survive a restart of the app).
STARTED: set[str] = set()


async def can_watch(request: Any, job_id: str) -> bool:
    if job_id in STARTED:
        return True
    return STORE is not None and await STORE.load(keys.job(job_id)) is not None


app = FastAPI(title="CSV import")
events = os.environ.get("REDIS_URL", BROKER_URL)  # where the tasks publish
app.include_router(
    progress_router(authorize=can_watch, redis_url=events, store=STORE), prefix="/progress"
)


@app.post("/imports", status_code=202)
async def start_import(request: Request) -> dict[str, str]:
    """The request body is the CSV (a header line with an `email` column)."""
    job = import_csv.delay((await request.body()).decode())
    STARTED.add(job.id)
    return {"job_id": job.id, "stream_url": f"/progress/{job.id}/stream"}


@app.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(Path(__file__).with_name("index.html"))
