"""The `kinora` command as users run it: `kinora up` from start to Ctrl-C, and
`kinora users create`."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from kinora.cli.embedded import free_port
from tests.utils.clients import assert_whole_generation, events_of, fresh_machine_env, read_stream
from tests.utils.processes import wait_for

pytestmark = pytest.mark.slow


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plain_kinora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`kinora` from a venv made by the Makefile's own rule for `make run`: the project
    alone, none of the test extras. pytest pulls in packages (`packaging`, ...) that a
    user's install may lack; a test run from the test venv cannot see that."""
    venv = tmp_path_factory.mktemp("plain") / "venv"
    subprocess.run(
        ["make", "-C", str(ROOT), f"VENV={venv}", f"{venv}/.installed"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import pytest"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert probe.returncode != 0, "the plain venv must not hold the test extras"
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file()) / 2**20
    print(f"`make run`'s venv (kinora[app]): {size:.0f} MB")
    return venv / "bin" / "kinora"


class Up:
    """`kinora up` as a user runs it, its output in a file (a pipe can block the test
    when a grandchild keeps it open)."""

    def __init__(self, kinora: Path, cwd: Path, port: int) -> None:
        self.log = cwd / f"up-{port}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(kinora), "up", "--port", str(port)],
                cwd=cwd,
                env=fresh_machine_env(MOCK_STEP_SECONDS="0.2"),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def token(self, timeout: float = 60) -> str:
        def printed() -> bool:
            assert self.process.poll() is None, self.log.read_text()
            return any(line.startswith("Token: ") for line in self.lines())

        wait_for("the Token line", printed, timeout=timeout)
        return next(line for line in self.lines() if line.startswith("Token: "))[7:]

    def kill(self) -> None:
        if self.process.poll() is None:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                child.kill()
            self.process.kill()
            self.process.wait(5)


def test_kinora_up_from_a_plain_install_runs_everything_and_stops_cleanly(
    tmp_path: Path, plain_kinora: Path
) -> None:
    port = free_port()
    up = Up(plain_kinora, tmp_path, port)
    try:
        token = up.token()
        assert f"Open http://127.0.0.1:{port}/?token={token}" in up.lines()

        children = psutil.Process(up.process.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "redis-server" in names
        assert "worker" in names
        assert "worker --webhooks" in names  # the webhook worker runs from the plain install
        assert not [line for line in up.lines() if "exited" in line]  # and nothing crashed
        assert "api" in names
        # the embedded Redis listens on loopback only
        redis_proc = next(c for c in children if "redis-server" in c.name())
        listening = [c for c in redis_proc.net_connections() if c.status == "LISTEN"]
        assert listening
        assert all(c.laddr.ip == "127.0.0.1" for c in listening)
        assert (tmp_path / "var" / "kinora.db").exists()

        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        created = httpx.post(
            f"{base}/api/v1/videos/generate",
            json={"prompt": "A windmill turning in the evening light"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        ).json()
        status, stream = read_stream(created["stream_url"])
        assert status == 200, up.log.read_text()
        assert_whole_generation(events_of(stream))
        # One scrape of the API shows the worker's task too: they share metric files.
        wait_for(
            "the worker's task in the API's /metrics",
            lambda: (
                'kinora_tasks_total{outcome="completed"} 1.0'
                in httpx.get(f"{base}/metrics", timeout=5).text
            ),
            timeout=10,
        )

        started = time.monotonic()
        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(15) == 0
        assert time.monotonic() - started < 10
        _gone, alive = psutil.wait_procs(children, timeout=2)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        up.kill()

    # A second start reuses the demo user and its token.
    again = Up(plain_kinora, tmp_path, free_port())
    try:
        assert again.token() == token
        again.process.send_signal(signal.SIGINT)  # Ctrl-C
        assert again.process.wait(15) == 0
    finally:
        again.kill()


def test_users_create_prints_the_token_last(
    tmp_path: Path, environment: dict[str, str], stack: object
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kinora", "users", "create", "cli@test.kinora", "--credits", "300"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    token = result.stdout.strip().splitlines()[-1]
    assert token.startswith("kin_")
    from tests.utils.processes import Stack

    assert isinstance(stack, Stack)
    with httpx.Client(base_url=stack.base_url, timeout=10) as client:
        response = client.get("/api/v1/videos", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert response.json()["total"] == 0

    duplicate = subprocess.run(
        [sys.executable, "-m", "kinora", "users", "create", "cli@test.kinora"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert duplicate.returncode != 0
    assert "exists already" in duplicate.stderr
