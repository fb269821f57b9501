"""One connection for many videos (docs/protocol.md §6), end to end: real Redis, a real
Celery worker, the API under uvicorn. `GET /api/v1/stream` carries the whole
generation of every video it follows, each in its own order; without `video` it
follows every video of the caller that runs, and those submitted while it is open."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest

from tests.utils.accounts import Account, make_account
from tests.utils.clients import assert_whole_generation, submit
from tests.utils.processes import Stack

pytestmark = pytest.mark.slow


def by_video(events: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    found: dict[int, list[dict[str, Any]]] = {}
    for event in events:
        found.setdefault(event["video_id"], []).append(event)
    return found


class Reader(threading.Thread):
    """Reads one many-videos stream until `done` says it has what it waits for."""

    def __init__(self, url: str, headers: dict[str, str], wanted: int) -> None:
        super().__init__(daemon=True)
        self.url, self.headers, self.wanted = url, headers, wanted
        self.events: list[dict[str, Any]] = []
        self.ids: list[str] = []
        self.status = 0
        self.open = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with (
                httpx.Client(timeout=httpx.Timeout(10, read=30)) as client,
                client.stream("GET", self.url, headers=self.headers) as response,
            ):
                self.status = response.status_code
                self.open.set()
                for line in response.iter_lines():
                    if line.startswith("id: "):
                        self.ids.append(line[4:])
                    elif line.startswith("data: "):
                        self.events.append(json.loads(line[6:]))
                        if sum(e["type"] == "complete" for e in self.events) >= self.wanted:
                            return
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.open.set()


def test_all_my_videos_on_one_stream_including_those_submitted_while_it_is_open(
    stack: Stack,
) -> None:
    account = make_account()
    before = [submit(stack, account, f"A paper boat on a river, take {i}") for i in range(2)]
    reader = Reader(f"{stack.base_url}/api/v1/stream", account.headers, wanted=5)
    reader.start()
    assert reader.open.wait(10)
    assert reader.status == 200
    after = [submit(stack, account, f"A kite over the dunes, take {i}") for i in range(3)]
    reader.join(90)
    assert not reader.is_alive()
    assert reader.error is None, reader.error
    videos = by_video(reader.events)
    assert set(videos) == {v["video_id"] for v in before + after}
    for events in videos.values():
        assert_whole_generation(events)
    # Each id is the stream's cursor; the last names the announcements it has read.
    assert reader.ids[-1].startswith("new:") or ",new:" in reader.ids[-1]


def test_listed_videos_end_the_stream_and_the_last_id_is_a_204(
    stack: Stack, account: Account
) -> None:
    videos = [submit(stack, account, f"A snail crossing a leaf, take {i}") for i in range(3)]
    listed = "&".join(f"video={v['video_id']}" for v in videos)
    url = f"{stack.base_url}/api/v1/stream?{listed}"
    reader = Reader(url, account.headers, wanted=3)
    reader.start()
    reader.join(90)
    assert not reader.is_alive()
    assert reader.error is None, reader.error
    assert reader.status == 200
    for events in by_video(reader.events).values():
        assert_whole_generation(events)
    with stack.client() as client:
        done = client.get(url, headers={**account.headers, "Last-Event-ID": reader.ids[-1]})
        assert done.status_code == 204
        # A reconnect from the middle gets exactly the rest, every video at once.
        middle = len(reader.ids) // 2
        rest = client.get(url, headers={**account.headers, "Last-Event-ID": reader.ids[middle]})
        assert rest.status_code == 200
        replayed = [json.loads(line[6:]) for line in rest.text.splitlines() if line[:6] == "data: "]
        # (each video's events in its own order; the videos need not interleave as live)
        assert by_video(replayed) == by_video(reader.events[middle + 1 :])

        # Someone else's video makes the whole request a 404; a video's scoped
        # stream_url is not an API token.
        other = submit(stack, make_account(), "Someone else's video")
        foreign = client.get(f"{url}&video={other['video_id']}", headers=account.headers)
        assert foreign.status_code == 404
        scoped = videos[0]["stream_url"].split("token=")[1]
        assert client.get(f"{url}&token={scoped}").status_code == 401
