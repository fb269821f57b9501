"""The API in the test's own process, used as a user would use the real server: a
client per account. No uvicorn and no worker: for tests that need no stream."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from fastapi.testclient import TestClient

from tests.utils.accounts import Account


class AccountClient:
    """Requests as one account (or anonymous): its bearer token on every request."""

    def __init__(self, api: TestClient, headers: dict[str, str]) -> None:
        self.api = api
        self.headers = headers

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        headers = {**self.headers, **(kwargs.pop("headers", None) or {})}
        return self.api.request(method, url, headers=headers, **kwargs)

    def get(self, url: str, **kwargs: Any) -> Any:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Any:
        return self.request("POST", url, **kwargs)

    def at_once(self, n: int, method: str, url: str, **kwargs: Any) -> list[Any]:
        """`n` identical requests in flight together (from `n` threads)."""
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda _: self.request(method, url, **kwargs), range(n)))


class InProcessApi:
    def __init__(self, api: TestClient) -> None:
        self.api = api

    @contextmanager
    def client(self, account: Account | None = None) -> Iterator[AccountClient]:
        yield AccountClient(self.api, account.headers if account else {})
