"""Small helpers the service tests share."""

from __future__ import annotations

import json
from pathlib import Path

import httpx


def jsonl(*records) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


def write_jsonl(path: Path, *records) -> Path:
    path.write_bytes(jsonl(*records))
    return path


def raw(deployment, key: str) -> httpx.Client:
    """A plain HTTP client, for asserting exact status codes and error bodies."""
    return httpx.Client(base_url=deployment.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    return response.json()["error"]


def upload(client: httpx.Client, content: bytes, purpose: str = "prompts", filename: str = "data.jsonl") -> httpx.Response:
    return client.post("/v1/files", data={"purpose": purpose}, files={"file": (filename, content, "application/jsonl")})


PROMPTS = [{"prompt": f"Name {n} colours of the rainbow."} for n in range(1, 9)]
PREFERENCES_TRL = [{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."}]
PREFERENCES_OPENAI = [
    {
        "input": {"messages": [{"role": "user", "content": "Say hi."}]},
        "preferred_output": [{"role": "assistant", "content": "Hi!"}],
        "non_preferred_output": [{"role": "assistant", "content": "No."}],
    }
]
