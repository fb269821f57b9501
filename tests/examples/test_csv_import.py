"""examples/csv_import, run as its README says: a real Redis, a real Celery worker,
uvicorn; watched with `curl -N` and, in Chromium, with the browser module."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import sync_playwright

from kinora.cli.embedded import free_port
from tests.utils.browser import CHROMIUM, FLAGS
from tests.utils.processes import stop, wait_for

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "csv_import"
CSV = "email,name\nada@example.com,Ada\n,Nobody\ngrace@example.com,Grace\nalan@example.com,Alan\n"


def run(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *args], cwd=EXAMPLE, env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


@pytest.fixture(scope="module")
def example(environment: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("csv_import")
    env = {**environment, "BROKER_URL": environment["REDIS_URL"], "ROW_SECONDS": "0.05"}
    lines = sum(len((EXAMPLE / f).read_text().splitlines()) for f in ("app.py", "tasks.py"))
    print(f"examples/csv_import: {lines} lines of Python (app.py, tasks.py)")
    worker = run(["celery", "-A", "tasks", "worker", "--pool", "solo", "-Q", "csv_import",
                  "--loglevel", "INFO"], env, logs / "worker.log")  # fmt: skip
    port = free_port()
    api = run(["uvicorn", "app:app", "--port", str(port)], env, logs / "api.log")
    try:
        wait_for("the worker", lambda: b"ready." in (logs / "worker.log").read_bytes(), 30)
        wait_for("the app", lambda: b"startup complete" in (logs / "api.log").read_bytes(), 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(api)
        stop(worker)


def test_curl_prints_every_row_of_an_import(example: str) -> None:
    started = httpx.post(f"{example}/imports", content=CSV, timeout=10).json()
    assert started["stream_url"] == f"/progress/{started['job_id']}/stream"
    curl = subprocess.run(
        ["curl", "-sN", "--max-time", "30", example + started["stream_url"]],
        capture_output=True, text=True, timeout=40, check=True,
    )  # fmt: skip
    events = [
        json.loads(line[6:]) for line in curl.stdout.splitlines() if line.startswith("data: ")
    ]
    assert [e["seq"] for e in events] == list(range(1, 7))  # the count, 4 rows, the end
    assert {e["job_id"] for e in events} == {started["job_id"]}
    assert [e.get("progress") for e in events[1:5]] == [25, 50, 75, 100]
    assert events[2]["message"] == "row 2: skipped, no email"
    assert (events[-1]["type"], events[-1]["imported"], events[-1]["rows"]) == ("complete", 3, 4)
    # Someone else's job id is not this app's to show.
    assert httpx.get(f"{example}/progress/not-mine/stream", timeout=10).status_code == 404


def test_the_page_watches_an_import_with_the_browser_module(example: str, tmp_path: Path) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(example)
            page.fill("#csv", CSV)
            page.click("button")
            page.wait_for_function(
                "document.getElementById('result').textContent === 'Imported 3 of 4 rows'"
            )
            assert page.eval_on_selector("#bar", "bar => bar.value") == 100
            rows = page.eval_on_selector_all("#log li", "els => els.map(e => e.textContent)")
            assert rows[0] == "4 rows to import"
            assert rows[1:5] == [
                "row 1: ada@example.com", "row 2: skipped, no email",
                "row 3: grace@example.com", "row 4: alan@example.com",
            ]  # fmt: skip
            page.screenshot(path=str(tmp_path / "csv_import.png"))
        finally:
            browser.close()
