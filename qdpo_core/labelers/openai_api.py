"""A labeler behind any OpenAI-compatible `/chat/completions` endpoint (vLLM, llama.cpp, TGI, OpenAI, ...).

    spec = LabelerSpec(kind="openai", base_url="http://localhost:8001/v1", model="qwen2.5-7b-instruct")
    labeler = OpenAILabeler(spec, place="rlaif.labeler")   # API key read from env var spec.api_key_env
    labeler.choose([[{"role": "user", "content": "... Answer 1 or 2."}]], ("1", "2"))

`choose` asks for one token with `logprobs=true, top_logprobs=20` and reads the choices' log-probs
from the first token's top list. An endpoint that returns no log-probs is asked again for a short
reply and its verdict parsed from the text; from then on it is not asked for log-probs again.

Connection errors, timeouts, 429 and 5xx answers are retried (`max_retries`, exponential back-off);
what still fails raises `LabelerUnavailable`, and a reply that is not a chat completion raises
`LabelerBadResponse`. Both name `<place>.base_url` so the user knows which setting to fix.

Under a restrictive outbound policy (`qdpo_core.outbound`, set by a service's worker) the client
connects only through a transport that checks every address it connects to; a refused address
raises `OutboundRefused` naming `<place>.base_url`, and is not retried.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from qdpo_core import outbound
from qdpo_core.config import LabelerSpec
from qdpo_core.labelers.base import Choice, LabelerBadResponse, LabelerUnavailable, from_logprobs, parse_verdict

TOP_LOGPROBS = 20  # OpenAI's maximum; choices outside the top list get the list's lowest log-prob
VERDICT_TOKENS = 16  # reply length when the verdict must be parsed from text


class _Retryable(Exception):
    """A 429 / 5xx answer: worth asking again."""

    def __init__(self, response: httpx.Response):
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, (_Retryable, httpx.TransportError)) and outbound.blocked_cause(exc) is None


class OpenAILabeler:
    def __init__(self, spec: LabelerSpec, place: str):
        self.spec, self.place = spec, place
        self.base_url = str(spec.base_url).rstrip("/")
        self.description = f"{spec.model} at {self.base_url}"
        self.logprobs_supported: bool | None = None  # learnt from the first answer
        headers = {}
        api_key = os.environ.get(spec.api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.policy = outbound.current_policy()
        transport = outbound.GuardedTransport(self.policy, limits=httpx.Limits(max_connections=spec.max_concurrency)) if self.policy.restricts else None
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=spec.timeout_seconds, transport=transport)

    def close(self) -> None:
        self.client.close()

    # ---- the Labeler interface ------------------------------------------------------------
    def choose(self, conversations: list[list[dict]], choices: tuple[str, ...]) -> list[Choice]:
        first: list[Choice] = []
        if self.logprobs_supported is None and conversations:
            # one ask alone first: it tells whether the endpoint gives log-probs before the rest go out
            first, conversations = [self._choose_one(conversations[0], choices)], conversations[1:]
        return first + self._map(lambda conversation: self._choose_one(conversation, choices), conversations)

    def reply(self, conversations: list[list[dict]], max_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[str]:
        jobs = [(conversation, seed + i) for i, conversation in enumerate(conversations)]
        return self._map(lambda job: _message_text(self._complete(job[0], max_tokens, temperature, job[1]), self._param).strip(), jobs)

    # ---- internals ------------------------------------------------------------------------
    @property
    def _param(self) -> str:
        return f"{self.place}.base_url"

    def _map(self, function, items: list) -> list:
        if len(items) <= 1 or self.spec.max_concurrency == 1:
            return [function(item) for item in items]
        with ThreadPoolExecutor(max_workers=self.spec.max_concurrency) as pool:
            return list(pool.map(function, items))  # keeps order; the first error propagates

    def _choose_one(self, conversation: list[dict], choices: tuple[str, ...]) -> Choice:
        if self.logprobs_supported is not False:
            body = self._complete(conversation, 1, 0.0, 0, logprobs=True)
            entries = _first_token_top_logprobs(body)
            if entries is None:
                self.logprobs_supported = False
            else:
                self.logprobs_supported = True
                logprobs = _choice_logprobs(entries, choices)
                if logprobs is not None:
                    return from_logprobs(logprobs)
                # no choice among the likely first tokens (e.g. "Response 2 ..."): read the verdict instead
        return parse_verdict(_message_text(self._complete(conversation, VERDICT_TOKENS, 0.0, 0), self._param), choices)

    def _complete(self, conversation: list[dict], max_tokens: int, temperature: float, seed: int, logprobs: bool = False) -> dict:
        payload = {"model": self.spec.model, "messages": conversation, "max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        if logprobs:
            payload.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        try:
            for attempt in Retrying(
                stop=stop_after_attempt(self.spec.max_retries + 1),
                wait=wait_exponential(multiplier=0.25, max=4.0),
                retry=retry_if_exception(_retryable),
                reraise=True,
            ):
                with attempt:
                    response = self.client.post("/chat/completions", json=payload)
                    if response.status_code == 429 or response.status_code >= 500:
                        raise _Retryable(response)
        except _Retryable as exc:
            raise self._unavailable(f"answered HTTP {exc.response.status_code} {_snippet(exc.response)} after {self.spec.max_retries + 1} attempts") from exc
        except httpx.TimeoutException as exc:
            raise self._unavailable(
                f"did not answer within labeler.timeout_seconds={self.spec.timeout_seconds:g} s ({self.spec.max_retries + 1} attempts)"
            ) from exc
        except httpx.TransportError as exc:
            if (blocked := outbound.blocked_cause(exc)) is not None:
                host = httpx.URL(self.base_url).host
                raise outbound.OutboundRefused(outbound.refused_message(self._param, host, blocked.reason, self.policy), param=self._param) from exc
            raise self._unavailable(f"cannot be reached ({type(exc).__name__}: {exc}) after {self.spec.max_retries + 1} attempts") from exc
        if response.status_code in (401, 403):
            raise self._unavailable(
                f"refused the credentials (HTTP {response.status_code}); put the API key in the environment variable {self.spec.api_key_env}"
            )
        if response.status_code >= 400:
            raise self._unavailable(f"answered HTTP {response.status_code} {_snippet(response)}; check base_url and model {self.spec.model!r}")
        try:
            body = response.json()
        except ValueError as exc:
            raise LabelerBadResponse(
                f"{self._param}: {self.base_url} answered with something that is not JSON ({_snippet(response)}); is it an OpenAI-compatible /chat/completions endpoint?",
                param=self._param,
            ) from exc
        if not isinstance(body, dict) or not isinstance(body.get("choices"), list) or not body["choices"] or not isinstance(body["choices"][0], dict):
            raise LabelerBadResponse(
                f"{self._param}: {self.base_url} answered JSON without 'choices' ({_snippet(response)}); is it an OpenAI-compatible /chat/completions endpoint?",
                param=self._param,
            )
        return body

    def _unavailable(self, what: str) -> LabelerUnavailable:
        return LabelerUnavailable(f"{self._param}: the labeler at {self.base_url} {what}", param=self._param)


def _snippet(response: httpx.Response, limit: int = 200) -> str:
    text = response.text.strip().replace("\n", " ")
    return repr(text[:limit] + ("…" if len(text) > limit else ""))


def _message_text(body: dict, param: str) -> str:
    message = body["choices"][0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if content is None and isinstance(message, dict) and message.get("refusal"):
        content = ""  # a refusal is an answer without a verdict, not a broken endpoint
    if not isinstance(content, str):
        raise LabelerBadResponse(f"{param}: the endpoint's answer has no choices[0].message.content", param=param)
    return content


def _first_token_top_logprobs(body: dict) -> list[dict] | None:
    """choices[0].logprobs.content[0].top_logprobs, or None when the endpoint gave no log-probs."""
    logprobs = body["choices"][0].get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not content or not isinstance(content[0], dict):
        return None
    first = content[0]
    top = first.get("top_logprobs") or []
    entries = [e for e in top if isinstance(e, dict) and isinstance(e.get("token"), str) and isinstance(e.get("logprob"), (int, float))]
    if isinstance(first.get("token"), str) and isinstance(first.get("logprob"), (int, float)):
        entries.append({"token": first["token"], "logprob": first["logprob"]})
    return entries or None


def _choice_logprobs(entries: list[dict], choices: tuple[str, ...]) -> list[float] | None:
    """Log-prob of each choice: the log-sum-exp over listed tokens spelling it ("1", " 1", ...).

    None when no choice is among the listed tokens at all.
    """
    floor = min(e["logprob"] for e in entries)  # an unlisted token is at most as likely as the least listed one
    seen: dict[str, float] = {}
    for e in entries:
        seen[e["token"]] = e["logprob"]  # the sampled token may repeat a top entry; count it once
    result, found = [], False
    for choice in choices:
        matching = [lp for token, lp in seen.items() if token.strip().lower() == choice.lower()]
        found = found or bool(matching)
        result.append(_logsumexp(matching) if matching else floor)
    return result if found else None


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))
