"""Where the client finds its server and its API key, and where each came from.

    base URL                                          API key
    1. the argument (`Client(base_url)`, --base-url)   1. the argument (`Client(api_key=…)`, --api-key)
    2. QDPO_BASE_URL                                   2. QDPO_API_KEY
    3. QDPO_HOST / QDPO_PORT (where `qdpo serve` listens)
    4. the config file                                 3. the config file, when it is for that same URL
    5. http://127.0.0.1:8000

The config file is `$XDG_CONFIG_HOME/qdpo/config.json` (`~/.config/qdpo/config.json` when
XDG_CONFIG_HOME is unset): `{"base_url": …, "api_key": …}`, mode 0600. `qdpo serve` writes it
with its own URL and the embedded service's key, so the client works from any directory. The
config's key is only ever sent to the config's server.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from qdpo_client.errors import QdpoClientError

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_PORT = 8000
# Addresses a server binds to that a client cannot connect to as such.
_ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1", "[::]": "::1"}


class ConfigError(QdpoClientError):
    """The client config file cannot be used; the message names the file and the fix."""


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "qdpo" / "config.json"


def read_config(path: Path | None = None) -> dict:
    """The config file's contents ({} when there is none)."""
    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read the client config {path}: {exc}; fix its permissions or delete it") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"the client config {path} is not valid JSON ({exc}); fix it, delete it, or run `qdpo serve` to write it again") from exc
    if not isinstance(data, dict) or not all(isinstance(data.get(k), (str, type(None))) for k in ("base_url", "api_key")):
        raise ConfigError(f'the client config {path} must be a JSON object {{"base_url": "http://…", "api_key": "qdpo_sk_…"}}; fix or delete it')
    return data


def url_for(host: str | None, port: str | int | None) -> str:
    """The URL a client uses for a server bound to host:port (0.0.0.0 is reached as 127.0.0.1)."""
    host = (host or "127.0.0.1").strip()
    host = _ANY_ADDRESS.get(host, host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"http://{host}:{port or DEFAULT_PORT}"


def normalise_url(url: str) -> str:
    return url.strip().rstrip("/")


@dataclass(frozen=True)
class Connection:
    """The server and key a client uses, where each came from, and how to fix either (for error messages)."""

    base_url: str
    base_url_source: str
    api_key: str | None
    api_key_source: str | None
    config_file: Path
    given_as: tuple[str, str] = ("base_url=", "api_key=")  # how the caller passes each: arguments, or --base-url / --api-key

    def unreachable_hint(self) -> str:
        return (
            f"the URL came from {self.base_url_source}\n"
            f"start a local service with `qdpo serve` (it writes the client config), or point to a running one with "
            f"{self.given_as[0]}, QDPO_BASE_URL or QDPO_HOST/QDPO_PORT"
        )

    def unauthorized_hint(self) -> str:
        if self.api_key is None:
            held = "it holds a key only for its own base_url" if self.config_file.is_file() else "there is none"
            where = f"no API key was sent: none was given with {self.given_as[1]}, QDPO_API_KEY or in the client config {self.config_file} ({held})"
        else:
            shown = self.api_key[:12] + "…" if len(self.api_key) > 16 else "…"
            where = f"the API key {shown} came from {self.api_key_source} and {self.base_url} does not accept it"
        return (
            f"{where}\n"
            f"get a key with `qdpo keys create --tenant NAME` where the service runs (`qdpo serve` prints one and writes it to the client config), "
            f"then pass it with {self.given_as[1]} or QDPO_API_KEY"
        )


def resolve_connection(base_url: str | None = None, api_key: str | None = None, *, given_as: tuple[str, str] = ("base_url=", "api_key=")) -> Connection:
    """Find the base URL and key in the order of this module's docstring; `given_as` names the arguments in messages."""
    path = config_path()
    config: dict | None = None

    def from_config() -> dict:
        nonlocal config
        if config is None:
            config = read_config(path)
        return config

    env = os.environ
    if base_url:
        url, url_source = base_url, given_as[0]
    elif env.get("QDPO_BASE_URL"):
        url, url_source = env["QDPO_BASE_URL"], "QDPO_BASE_URL"
    elif env.get("QDPO_HOST") or env.get("QDPO_PORT"):
        named = " and ".join(f"{name}={env[name]}" for name in ("QDPO_HOST", "QDPO_PORT") if env.get(name))
        url, url_source = url_for(env.get("QDPO_HOST"), env.get("QDPO_PORT")), named
    elif from_config().get("base_url"):
        url, url_source = from_config()["base_url"], f"the client config {path}"
    else:
        url, url_source = DEFAULT_BASE_URL, f"the default (no {given_as[0]}, QDPO_BASE_URL, QDPO_HOST/QDPO_PORT or client config {path})"
    url = normalise_url(url)

    if api_key:
        key, key_source = api_key, given_as[1]
    elif env.get("QDPO_API_KEY"):
        key, key_source = env["QDPO_API_KEY"], "QDPO_API_KEY"
    elif from_config().get("api_key") and normalise_url(from_config().get("base_url") or "") == url:
        key, key_source = from_config()["api_key"], f"the client config {path}"
    else:
        key, key_source = None, None
    return Connection(url, url_source, key, key_source, path, given_as)
