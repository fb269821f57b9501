"""A rolling restart behind a real load balancer (README, Stopping and scaling): two
`kinora api` processes behind Debian's nginx with the configuration the repository
keeps (deploy/nginx/kinora.conf), clients following a video that publishes all the
while, each API process restarted in turn (SIGTERM, then started again on its port).
Every client gets every event exactly once, in order, and the end."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from kinora.cli.embedded import free_port
from kinora.streaming import keys
from kinora.streaming.logger import SSELogger
from tests.utils.accounts import Account
from tests.utils.clients import pending_video
from tests.utils.nginx import front, status
from tests.utils.processes import kinora, stop, wait_for

pytestmark = pytest.mark.slow

CLIENTS = 200


class Clients(threading.Thread):
    """CLIENTS EventSource-like clients: each reconnects with Last-Event-ID whenever its
    response ends or its connection breaks, until it has the `complete`."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.url, self.headers = url, headers
        self.seqs: list[list[int]] = [[] for _ in range(CLIENTS)]
        self.done = [False] * CLIENTS
        self.connects = [0] * CLIENTS
        self.problems: list[str] = []

    def run(self) -> None:
        asyncio.run(self.main())

    async def main(self) -> None:
        limits = httpx.Limits(max_connections=CLIENTS + 10)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(10, read=20)) as c:
            await asyncio.gather(*(self.one(c, i) for i in range(CLIENTS)))

    async def one(self, client: httpx.AsyncClient, i: int) -> None:
        deadline = time.monotonic() + 120
        while not self.done[i] and time.monotonic() < deadline:
            headers = dict(self.headers)
            if self.seqs[i]:
                headers["Last-Event-ID"] = str(self.seqs[i][-1])
            try:
                async with client.stream("GET", self.url, headers=headers) as response:
                    self.connects[i] += 1
                    if response.status_code != 200:
                        if response.status_code == 204:
                            self.problems.append(f"client {i}: 204 before the end")
                            return
                        await asyncio.sleep(0.3)
                        continue
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            event = json.loads(line[6:])
                            self.seqs[i].append(event["seq"])
                            if event["type"] == "complete":
                                self.done[i] = True
            except httpx.HTTPError:
                pass  # its process went away mid-stream: come back, as EventSource does
            await asyncio.sleep(0.3)


def test_a_rolling_restart_loses_and_repeats_no_event_for_any_client(
    account: Account, environment: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **environment, "DRAIN_SECONDS": "1", "SSE_RETRY_MS": "300",
        "MAX_STREAMS_PER_USER": "0", "SSE_PING_SECONDS": "1",
    }  # fmt: skip
    ports = [free_port(), free_port()]
    apis = {port: kinora("api", "--port", str(port), env=env, log=tmp_path / f"api-{port}.log")
            for port in ports}  # fmt: skip
    publishing = threading.Event()
    try:
        for port in ports:
            wait_for(f"API {port}", lambda p=port: _ready(p), timeout=30)
        with front(tmp_path, ports) as base:
            video = pending_video(account)
            publisher = threading.Thread(target=_publish, args=(video, publishing), daemon=True)
            publisher.start()
            clients = Clients(f"{base}/api/v1/videos/{video}/stream", account.headers)
            clients.start()
            wait_for("every client streaming", lambda: all(clients.seqs), timeout=30)
            for port in ports:  # one at a time, as a rolling update does
                time.sleep(1.0)
                apis[port].terminate()
                assert apis[port].wait(15) in (0, -15)
                log = tmp_path / "again.log"
                apis[port] = kinora("api", "--port", str(port), env=env, log=log)
                wait_for(f"API {port} again", lambda p=port: _ready(p), timeout=30)
            time.sleep(1.0)
            publishing.set()  # the video ends
            clients.join(60)
    finally:
        publishing.set()
        for api in apis.values():
            stop(api)
    assert not clients.problems, clients.problems[:5]
    assert all(clients.done), f"{clients.done.count(False)} clients without the end"
    end = clients.seqs[0][-1]
    for i, seqs in enumerate(clients.seqs):
        assert seqs == list(range(1, end + 1)), f"client {i}: {seqs[:3]}…{seqs[-3:]}"
    moved = sum(count > 1 for count in clients.connects)
    print(f"{end} events to each of {CLIENTS} clients; {moved} reconnected at least once")
    assert moved >= CLIENTS // 2  # the restarts did send them elsewhere


def _publish(video: int, stop_: threading.Event) -> None:
    with SSELogger(keys.video(video)) as log:
        i = 0
        while not stop_.is_set():
            i += 1
            log.step(5, f"Processing video... {i}", progress=min(84, 10 + i // 10))
            time.sleep(0.02)
        log.complete()


def _ready(port: int) -> bool:
    return status(f"http://127.0.0.1:{port}/readyz") == 200
