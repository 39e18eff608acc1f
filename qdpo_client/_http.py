"""HTTP plumbing shared by the sync and async clients: auth, retries, error mapping.

Retried (exponential backoff with jitter): connection failures, timeouts, 429 and 5xx answers.
Job creation is retried safely because every create sends an Idempotency-Key.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
from tenacity import AsyncRetrying, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from qdpo_client.errors import APIConnectionError, APIError, error_for

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
EMBEDDED_KEY_FILE = Path("var") / "api_key"  # written by `qdpo serve` for the local, embedded service


def default_base_url() -> str:
    return os.environ.get("QDPO_BASE_URL") or DEFAULT_BASE_URL


def default_api_key() -> str | None:
    """QDPO_API_KEY, else the key an embedded `qdpo serve` in this directory wrote for you."""
    key = os.environ.get("QDPO_API_KEY")
    if not key and EMBEDDED_KEY_FILE.is_file():
        key = EMBEDDED_KEY_FILE.read_text().strip()
    return key or None


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, APIError) and (exc.status_code >= 500 or exc.status_code == 429)


def _retry_policy(max_retries: int) -> dict:
    return {
        "stop": stop_after_attempt(max_retries + 1),
        "wait": wait_exponential_jitter(initial=0.5, max=8),
        "retry": retry_if_exception(_retryable),
        "reraise": True,
    }


def raise_for_error(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        raise error_for(response.status_code, body)
    return response


def client_options(base_url: str | None, api_key: str | None, timeout: float) -> dict:
    headers = {"User-Agent": "qdpo-client/0.1"}
    api_key = api_key or default_api_key()
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return {"base_url": (base_url or default_base_url()).rstrip("/"), "headers": headers, "timeout": httpx.Timeout(timeout, connect=10.0)}


class SyncHTTP:
    def __init__(self, http: httpx.Client, max_retries: int):
        self.http, self.max_retries = http, max_retries

    def request(self, method: str, path: str, *, retries: int | None = None, **kwargs) -> httpx.Response:
        retries = self.max_retries if retries is None else retries
        try:
            for attempt in Retrying(**_retry_policy(retries)):
                with attempt:
                    return raise_for_error(self.http.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            raise APIConnectionError(f"cannot reach {self.http.base_url}: {type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, **kwargs):
        return self.request(method, path, **kwargs).json()


class AsyncHTTP:
    def __init__(self, http: httpx.AsyncClient, max_retries: int):
        self.http, self.max_retries = http, max_retries

    async def request(self, method: str, path: str, *, retries: int | None = None, **kwargs) -> httpx.Response:
        retries = self.max_retries if retries is None else retries
        try:
            async for attempt in AsyncRetrying(**_retry_policy(retries)):
                with attempt:
                    return raise_for_error(await self.http.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            raise APIConnectionError(f"cannot reach {self.http.base_url}: {type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    async def json(self, method: str, path: str, **kwargs):
        return (await self.request(method, path, **kwargs)).json()
