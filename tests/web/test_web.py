"""The web page in a real browser (headless Chromium from Debian's packages, driven
by Playwright): generate from the form, watch it to the end across an API restart."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page

from kinora.cli.embedded import free_port
from tests.utils.accounts import Account, make_account
from tests.utils.processes import start_api, stop

pytestmark = pytest.mark.slow


class Api:
    """An API process of its own, so the test can kill and restart it."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process, _ = start_api(self.env, self.log, self.port)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


@pytest.fixture
def api(stack: object, environment: dict[str, str], tmp_path: Path) -> Iterator[Api]:
    server = Api(environment, tmp_path / "api.log")
    server.start()
    yield server
    server.stop()


def screenshot(page: Page, tmp_path: Path, name: str) -> None:
    """The picture; with KINORA_SCREENSHOTS=<dir> (as for the README's, in docs/), kept."""
    shot = tmp_path / name
    page.screenshot(path=str(shot))
    if os.environ.get("KINORA_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["KINORA_SCREENSHOTS"]) / name)


def open_page(browser: Browser, api: Api, account: Account, width: int = 1200) -> Page:
    page = browser.new_page(viewport={"width": width, "height": 900 if width > 600 else 844})
    page.set_default_timeout(30_000)
    page.goto(f"{api.base}/?token={account.token}")
    page.wait_for_selector("#app:not([hidden])")
    return page


def generate(page: Page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#generate")
    page.wait_for_selector("#detail:not([hidden])")


def log_seqs(page: Page) -> list[int]:
    return [
        int(s) for s in page.eval_on_selector_all("#log li", "els => els.map(e => e.dataset.seq)")
    ]


def test_generate_and_watch_to_the_end_across_an_api_restart(
    browser: Browser, api: Api, environment: dict[str, str], tmp_path: Path
) -> None:
    account: Account = make_account()
    page = open_page(browser, api, account)
    assert "token=" not in page.url  # taken out of the address bar, kept in localStorage

    page.fill("#prompt", "A paper lantern floating over a dark lake")
    page.dblclick("#generate")  # a double click makes one video
    page.wait_for_function("document.querySelectorAll('#log li').length >= 6")
    page.wait_for_selector("#connection[data-state='connected']")
    page.wait_for_function("+document.getElementById('bar').getAttribute('aria-valuenow') >= 40")
    page.wait_for_timeout(400)  # only for the picture: the bar's CSS transition
    screenshot(page, tmp_path, "screenshot.png")

    api.kill()  # the stream drops mid-generation
    page.wait_for_selector("#connection[data-state='reconnecting']")
    api.start()
    page.wait_for_selector("#connection[data-state='done']", timeout=60_000)

    assert page.get_attribute("#bar", "aria-valuenow") == "100"
    seqs = log_seqs(page)
    assert seqs == list(range(1, len(seqs) + 1))  # no line missing, none twice
    steps = page.eval_on_selector_all("#log li[data-step]", "els => els.map(e => +e.dataset.step)")
    assert set(steps) == set(range(10))
    page.wait_for_function(
        "(() => { const v = document.getElementById('player');"
        " return !v.hidden && v.readyState >= 1 && v.duration > 0; })()"
    )
    assert page.eval_on_selector("#player", "v => Math.round(v.duration)") == 4

    with httpx.Client(base_url=api.base, headers=account.headers, timeout=10) as client:
        assert client.get("/api/v1/videos").json()["total"] == 1
    page.close()


def test_signed_out_the_page_asks_for_a_token_only_and_says_when_it_is_wrong(
    browser: Browser, api: Api
) -> None:
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.goto(f"{api.base}/")
    page.wait_for_selector("#sign-in:not([hidden])")
    assert not page.is_visible("#app")  # not the form under "Sign in"
    assert not page.is_visible("#generate-form")
    page.fill("#token-input", "kin_not-a-real-token")
    page.click("#token-form button")
    page.wait_for_selector("#sign-in-error:not([hidden])")
    assert "not accepted" in page.inner_text("#sign-in-error")
    assert page.is_visible("#sign-in-error")
    page.close()


def test_a_refused_video_is_unmistakably_failed(browser: Browser, api: Api, tmp_path: Path) -> None:
    page = open_page(browser, api, make_account())
    generate(page, "[mock:policy] Something the model will refuse to make")
    page.wait_for_selector("#connection[data-state='failed']")
    assert page.inner_text("#connection") == "failed"
    assert page.get_attribute("#bar", "data-status") == "failed"
    fill = page.eval_on_selector("#bar-fill", "e => getComputedStyle(e).backgroundImage")
    assert fill == "none"  # the plain red, not the working gradient
    error = page.inner_text("#error-box")
    assert error.startswith("Failed: ")
    assert "moderation" in error
    assert "attempt" not in error  # a final error is never "attempt 1 of 4"
    assert page.inner_text("#step") == "Failed"
    screenshot(page, tmp_path, "failed.png")
    page.close()


def test_a_retry_shows_its_real_countdown_then_goes_on(
    browser: Browser, api: Api, tmp_path: Path
) -> None:
    """The stack's worker retries after RETRY_COUNTDOWN_SECONDS=1."""
    page = open_page(browser, api, make_account())
    generate(page, "[mock:transient] A train crossing a snowy bridge at night")
    page.wait_for_function(
        "document.getElementById('error-box').textContent.includes('retrying in 1 s')"
    )
    text = page.inner_text("#error-box")
    assert "attempt 1 of 4 failed" in text
    assert "(server_error)" not in text  # words, not the raw code
    # A retry is not a final failure: it does not look like one.
    assert page.get_attribute("#error-box", "data-kind") == "retrying"
    colour = page.eval_on_selector("#error-box", "e => getComputedStyle(e).backgroundColor")
    assert colour != "rgb(45, 23, 24)"  # the final failure's red
    screenshot(page, tmp_path, "retrying.png")
    page.wait_for_selector("#connection[data-state='done']", timeout=60_000)
    assert not page.is_visible("#error-box")  # the retry went through
    assert page.get_attribute("#bar", "data-status") == "completed"
    page.close()


def test_the_page_fits_a_phone_with_a_video_open(
    browser: Browser, api: Api, tmp_path: Path
) -> None:
    page = open_page(browser, api, make_account(), width=390)
    page.wait_for_selector("#videos li.empty")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    generate(page, "A very long prompt " + "without-any-break-in-it-at-all-" * 6)
    # The progress card, below the form on a phone, is brought into view once the page
    # has loaded the new video (it is shown first, then scrolled to).
    page.wait_for_function(
        "(() => { const top = document.getElementById('detail').getBoundingClientRect().top;"
        " return top >= 0 && top < innerHeight * 0.6; })()",
        timeout=10_000,
    )
    page.wait_for_function("document.querySelectorAll('#log li').length >= 6")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(page, tmp_path, "phone.png")
    page.wait_for_selector("#connection[data-state='done']", timeout=60_000)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.close()


def test_eight_running_videos_move_on_one_connection_and_the_page_still_answers(
    browser: Browser, api: Api
) -> None:
    """The list follows every running video with watchMany: ONE stream for all eight,
    so the page keeps its other five connections for the requests it makes meanwhile
    (eight streams of their own would leave it none: a browser holds six per origin)."""
    account = make_account()
    with httpx.Client(base_url=api.base, headers=account.headers, timeout=30) as client:
        ids = []
        for i in range(8):
            body = {"prompt": f"A lantern drifting on a lake, take {i}", "seconds": 8}
            response = client.post("/api/v1/videos/generate", json=body)
            assert response.status_code == 202, response.text
            ids.append(response.json()["video_id"])
    streams: list[str] = []
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(30_000)
    page.on("request", lambda r: streams.append(r.url) if "/stream" in r.url else None)
    page.goto(f"{api.base}/?token={account.token}")
    page.wait_for_selector("#videos[data-stream='connected']")
    # While all eight run, the page opens one of them: its details and its own stream.
    page.click(f"#videos li[data-id='{ids[3]}']")
    page.wait_for_function(
        "document.getElementById('detail-prompt').textContent.includes('take 3')",
        timeout=10_000,
    )
    # Every badge ends as its video did (some of the eight wait behind the others past
    # the tests' short deadline, and fail: the badge says so too).
    final = ".badge.completed, .badge.failed, .badge.cancelled"
    try:
        page.wait_for_function(
            f"document.querySelectorAll('#videos li').length === 8 && "
            f"document.querySelectorAll('#videos li :is({final})').length === 8",
            timeout=90_000,
        )
    except Exception:  # what the page showed, and what its one stream was doing
        print(page.eval_on_selector_all("#videos li", "els => els.map(e => e.textContent)"))
        print(page.eval_on_selector("#videos", "e => e.dataset.stream"), streams)
        raise
    shown = page.eval_on_selector_all(
        "#videos li", "els => els.map(e => [+e.dataset.id, e.querySelector('.badge').textContent])"
    )
    with httpx.Client(base_url=api.base, headers=account.headers, timeout=30) as client:
        truth = [[i, client.get(f"/api/v1/videos/{i}").json()["status"]] for i in ids]
    assert sorted(shown) == sorted(truth)
    many = [url for url in streams if "/api/v1/stream" in url]
    assert len(many) == 1, streams  # one connection carried all eight
    assert all(f"/videos/{ids[3]}/stream" in url for url in streams if url not in many)
    assert page.evaluate("document.querySelectorAll('#log li').length") >= 6
    page.close()


def test_the_api_docs_work_offline(browser: Browser, api: Api) -> None:
    """This browser reaches nothing but the server (a closed network): /docs and /redoc
    must not need a CDN (ReDoc's sidebar logo came from one), and no page asks for
    something the server does not have (/favicon.ico was a 404 on every page)."""
    page = browser.new_page()
    page.set_default_timeout(30_000)
    outside: list[str] = []
    missing: list[str] = []
    blocked: list[str] = []  # stopped by the page's own policy: never sent

    def ours(url: str) -> bool:
        return url.startswith((api.base, f"blob:{api.base}"))

    page.on("request", lambda r: None if ours(r.url) else outside.append(r.url))
    page.on("response", lambda r: missing.append(r.url) if r.status >= 400 else None)
    page.on(
        "requestfailed",
        lambda r: blocked.append(r.url) if "csp" in (r.failure or "").lower() else None,
    )
    page.goto(f"{api.base}/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert page.inner_text(".swagger-ui .info .title").startswith("Kinora")
    page.wait_for_selector("[data-path='/api/v1/videos/generate']")
    page.goto(f"{api.base}/redoc")
    page.wait_for_selector("h1:has-text('Kinora')")
    page.wait_for_selector('text="/api/v1/videos/generate"')
    page.goto(f"{api.base}/")
    page.wait_for_selector("#sign-in:not([hidden])")
    page.wait_for_timeout(500)  # a favicon is asked for after the page loaded
    assert outside == blocked, "a page reached out of the server"
    assert missing == []
    favicon = httpx.get(f"{api.base}/favicon.ico", timeout=10)
    assert favicon.status_code == 200
    assert favicon.headers["content-type"].startswith("image/")
    page.close()


@pytest.mark.parametrize("width", [1200, 390])
def test_the_format_choice_is_never_cut(browser: Browser, api: Api, width: int) -> None:
    """ "Landscape 16:9" was shown as "Landscape 16:" on desktop and phone: each choice's
    text fits its select, beside the arrow (about 28 px, padding included)."""
    page = open_page(browser, api, make_account(), width=width)
    room = page.eval_on_selector(
        "#size",
        """s => { const style = getComputedStyle(s);
                  const pen = document.createElement('canvas').getContext('2d');
                  pen.font = style.font;
                  const sizes = [...s.options].map(o => pen.measureText(o.text).width);
                  const widest = Math.max(...sizes);
                  const inside = s.clientWidth - parseFloat(style.paddingLeft) - 28;
                  return inside - widest; }""",
    )
    print(f"format select at {width} px: {room:.0f} px to spare")
    assert room >= 0, f"the widest choice is {-room:.0f} px too wide at {width} px"
    page.close()
