"""`kinora generate --watch` and `kinora watch`, run as users run them."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kinora.cli.embedded import free_port
from tests.utils.accounts import Account
from tests.utils.clients import submit
from tests.utils.processes import Stack, start_api, stop, wait_for

pytestmark = pytest.mark.slow


def run_cli(
    stack: Stack, account: Account, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kinora", *args],
        env={**env, "KINORA_URL": stack.base_url, "KINORA_TOKEN": account.token},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def seqs(output: str) -> list[int]:
    return [int(m) for m in re.findall(r"#(\d+)\s", output)]


def test_generate_watch_follows_to_the_end_and_exits_0(
    stack: Stack, account: Account, environment: dict[str, str]
) -> None:
    result = run_cli(stack, account, environment, "generate", "A clock tower at noon", "--watch")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "queued (900 credits left)" in out
    for step in range(10):
        assert f"step {step} " in out
    found = seqs(out)
    assert found == list(range(1, len(found) + 1))
    assert re.search(r"completed: http://127\.0\.0\.1:\d+/api/v1/videos/\d+/content\?token=", out)


def test_a_failed_video_exits_1_and_a_cancelled_one_3(
    stack: Stack, account: Account, environment: dict[str, str]
) -> None:
    failed = run_cli(stack, account, environment, "generate", "[mock:policy] refused", "--watch")
    assert failed.returncode == 1
    assert "failed" in failed.stdout
    assert "final" in failed.stdout  # the refusal is not "attempt 1/4"
    assert "attempt" not in failed.stdout

    created = submit(stack, account, "A video cancelled before it starts")
    with stack.client(account) as client:
        assert client.post(f"/api/v1/videos/{created['video_id']}/cancel").status_code == 200
    cancelled = run_cli(stack, account, environment, "watch", str(created["video_id"]))
    assert cancelled.returncode == 3
    assert "cancelled" in cancelled.stdout


def test_a_bad_token_is_a_one_line_error(stack: Stack, environment: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kinora", "watch", "1", "--url", stack.base_url, "--token", "x"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 5  # not allowed, which is neither "failed" nor "unreachable"
    assert "401" in result.stderr
    assert "invalid API token" in result.stderr


def kinora_watch(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kinora", "watch", "1", "--token", "kin_x", *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_a_server_that_never_answers_fails_fast_with_its_own_exit_code(
    environment: dict[str, str],
) -> None:
    started = time.monotonic()
    down = kinora_watch("--url", f"http://127.0.0.1:{free_port()}", env=environment)
    assert down.returncode == 4
    assert time.monotonic() - started < 40  # not the 5 minutes it once took
    assert "cannot reach http://127.0.0.1:" in down.stderr
    assert "kinora up" in down.stderr
    assert "lost the stream" not in down.stderr  # it never had one


def test_a_url_without_a_scheme_is_a_usage_error(environment: dict[str, str]) -> None:
    bad = kinora_watch(env={**environment, "KINORA_URL": "127.0.0.1:8000"})
    assert bad.returncode == 2
    assert "needs http:// or https://" in bad.stderr


def test_watch_resumes_after_the_server_drops_it(
    stack: Stack, account: Account, environment: dict[str, str], tmp_path: Path
) -> None:
    """The API process dies mid-stream and comes back on the same port: the client
    reconnects with Last-Event-ID and prints every event exactly once."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**environment, "MOCK_STEP_SECONDS": "0.2"}

    api, _ = start_api(env, tmp_path / "api.log", port)
    client = subprocess.Popen(
        [sys.executable, "-m", "kinora", "generate", "A river through a canyon", "--watch"],
        env={**environment, "KINORA_URL": base, "KINORA_TOKEN": account.token},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert client.stdout is not None
        lines.extend(client.stdout)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for("a few events", lambda: len(seqs("".join(lines))) >= 4, timeout=30)
        api.kill()  # the connection drops mid-stream
        api.wait(10)
        time.sleep(1)  # the client is now retrying against a closed port
        api, _ = start_api(env, tmp_path / "api.log", port)
        assert client.wait(60) == 0
        reader.join(10)
    finally:
        if client.poll() is None:
            client.kill()
        client.wait(10)
        assert client.stdout is not None
        assert client.stderr is not None
        client.stdout.close()
        client.stderr.close()
        stop(api)
    found = seqs("".join(lines))
    assert found == list(range(1, len(found) + 1))
    assert "completed:" in "".join(lines)
