"""Operations endpoints: liveness, readiness and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from sqlalchemy import func, select, text

from kinora.api.deps import HubDep
from kinora.core import metrics
from kinora.core.db import get_engine, session_scope
from kinora.core.models import Video, VideoStatus

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


def _database_ok() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


@router.get(
    "/readyz", responses={503: {"description": "draining, or database or Redis unreachable"}}
)
async def readyz(request: Request, hub: HubDep) -> Any:
    """The database and Redis are reachable, and the process is not shutting down."""
    if request.app.state.progress.draining:  # SIGTERM: send no one new here
        return JSONResponse({"status": "draining"}, 503)
    checks: dict[str, str] = {}
    try:
        await run_in_threadpool(_database_ok)
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {exc}"
    try:
        await hub.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"unreachable: {exc}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        checks | {"status": "ready" if ready else "not ready"}, 200 if ready else 503
    )


def _videos_by_status() -> dict[str, int]:
    with session_scope() as session:
        rows = session.execute(select(Video.status, func.count()).group_by(Video.status))
        counts = {str(status): 0 for status in VideoStatus}
        counts.update({str(status): count for status, count in rows})
        return counts


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {metrics.CONTENT_TYPE: {}}, "description": "Prometheus text"}},
)
async def prometheus_metrics() -> Response:
    """Prometheus text format: events, deliveries, stream clients, slow clients cut,
    videos by status, task outcomes and durations, model call latency."""
    counts = await run_in_threadpool(_videos_by_status)
    body = await run_in_threadpool(metrics.render, metrics.VideosByStatus(counts))
    return Response(body, media_type=metrics.CONTENT_TYPE)
