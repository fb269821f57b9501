"""Operations endpoints: liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text

from kinora.api.deps import HubDep
from kinora.db import get_engine

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


def _database_ok() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


@router.get("/readyz", responses={503: {"description": "database or Redis unreachable"}})
async def readyz(hub: HubDep) -> Any:
    """The database and Redis are reachable."""
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
