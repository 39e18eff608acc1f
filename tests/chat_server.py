"""A small OpenAI-compatible chat-completions server for tests, run for real on a free localhost port.

    with serve(create_app(model_dir)) as base_url:        # "http://127.0.0.1:<port>/v1"
        httpx.post(base_url + "/chat/completions", json={"model": "m", "messages": [...], "logprobs": True, "top_logprobs": 5})

Behaviours (`mode`):
  model       answers from a local Hugging Face model with plain transformers (greedy at temperature 0),
              with per-token top log-probs when asked for — the way vLLM or llama.cpp answer
  rule        a labeler that follows fixed rules and gives no log-probs, ever (like many hosted APIs):
              for a "[Response 1] … [Response 2] …" comparison it names the longer response in words
              ("I prefer Response 2."), consistently under order swaps; for "Statement: … supported by
              the reference passages?" it says Yes when every word of the statement is in the passages;
              for a fill-in-the-blank (____) question it answers `blank_answer`; otherwise "Yes"
  slow        waits `delay` seconds before answering (for client timeouts)
  malformed   HTTP 200 with a body that is not JSON
  no_choices  HTTP 200 with JSON that is not a chat completion
  flaky       the first `fail_first` requests get HTTP 503, later ones are answered as in `model`
Every request is recorded in `app.state.requests` (payload and Authorization header); with
`api_key` set, requests without "Bearer <api_key>" get HTTP 401.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

_RESPONSES = re.compile(r"\[Response 1\]\n(.*?)\n\n\[Response 2\]\n(.*?)\n\n(?:Which response|Explain)", re.S)


class LocalChatModel:
    """Plain transformers, one conversation at a time (no padding): the reference behaviour."""

    def __init__(self, model_dir):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.lock = threading.Lock()  # one generation at a time: torch's RNG is global

    def complete(self, messages, max_tokens: int, temperature: float, seed: int, top_logprobs: int | None):
        torch = self.torch
        inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": None, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
        with self.lock, torch.no_grad():
            torch.manual_seed(seed)
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_tokens,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
                **sampling,
            )
        new = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        finish = "stop" if new and new[-1] == self.tokenizer.eos_token_id else "length"
        if finish == "stop":
            new = new[:-1]
        logprobs = None
        if top_logprobs is not None:
            content = []
            for token, logits in zip(new, out.logits):
                row = torch.log_softmax(logits[0].float(), -1)  # (V,)
                values, ids = row.topk(top_logprobs)
                content.append(
                    {
                        "token": self.tokenizer.decode([token]),
                        "logprob": float(row[token]),
                        "top_logprobs": [{"token": self.tokenizer.decode([i]), "logprob": float(v)} for v, i in zip(values.tolist(), ids.tolist())],
                    }
                )
            logprobs = {"content": content}
        return self.tokenizer.decode(new, skip_special_tokens=True), logprobs, finish


def _completion(model: str, text: str, logprobs=None, finish: str = "stop") -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": finish}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def rule_reply(prompt: str, blank_answer: str) -> str:
    comparison = _RESPONSES.search(prompt)
    if comparison is not None:
        first, second = comparison.group(1), comparison.group(2)
        return "Response 1 is better." if len(first) >= len(second) else "I prefer Response 2."
    support = re.search(r"Reference passages:\n(.*?)\n\nContext:.*?Statement: (.*?)\n\n", prompt, re.S)
    if support is not None:
        return "Yes, it is." if _words(support.group(2)) <= _words(support.group(1)) else "No."
    if "____" in prompt:
        return blank_answer
    return "Yes"


def create_app(
    model_dir=None, mode: str = "model", delay: float = 5.0, fail_first: int = 0, api_key: str | None = None, blank_answer: str = "Paris", chat=None
) -> FastAPI:
    """`chat`: an already built LocalChatModel to share between apps (else one is loaded from model_dir)."""
    app = FastAPI()
    app.state.requests = []
    if chat is None and mode in ("model", "flaky"):
        chat = LocalChatModel(model_dir)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        payload = await request.json()
        app.state.requests.append({"payload": payload, "authorization": request.headers.get("authorization")})
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": {"message": "invalid api key"}}, status_code=401)
        if mode == "slow":
            await asyncio.sleep(delay)
        if mode == "malformed":
            return PlainTextResponse('{"choices": [{"message": ', media_type="application/json")
        if mode == "no_choices":
            return JSONResponse({"result": "ok"})
        if mode == "flaky" and len(app.state.requests) <= fail_first:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        if mode == "rule":
            return JSONResponse(_completion(payload["model"], rule_reply(payload["messages"][-1]["content"], blank_answer)))
        top = payload.get("top_logprobs") if payload.get("logprobs") else None
        text, logprobs, finish = await asyncio.to_thread(
            chat.complete,
            payload["messages"],
            int(payload.get("max_tokens") or 16),
            float(payload.get("temperature") or 0.0),
            int(payload.get("seed") or 0),
            top,
        )
        return JSONResponse(_completion(payload["model"], text, logprobs, finish))

    return app


@contextmanager
def serve(app: FastAPI):
    """Run `app` with uvicorn on a free port in a background thread; yield its /v1 base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test chat server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
