"""Batched chat generation with a cap on new tokens; answers that hit the cap are marked unfinished.

Greedy decoding (what pairs, baselines and evaluation use) runs our own KV-cached loop: one prefill
that computes logits for the last position only, then one token per step for the rows still
answering — a row that has finished leaves the batch (its cache rows are dropped), and the loop
ends when every row has. Its cache is allocated once for the whole answer and written in place
(`PreallocatedLayer`): transformers' dynamic cache concatenates every layer's keys and values anew
at every step, which took a fifth of a 32-row batch's time here. It gives the same answers as
`model.generate(do_sample=False)` (tests/unit/test_generate.py). Sampling goes through
`model.generate`, whose samplers we do not copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer


@dataclass
class Response:
    ids: list[int]  # generated tokens, ending with the end-of-turn token when finished
    text: str
    finished: bool  # False when the answer was cut by max_new_tokens


@dataclass
class Decoding:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in buffers sized for the prompt and the whole answer, filled in place.

    `keys` / `values` are views of the filled part, as a dynamic layer's tensors would be; dropping
    finished rows copies the buffers once, where a dynamic layer copies everything at every step.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._keys = key_states.new_empty((*key_states.shape[:2], self.capacity, key_states.shape[-1]))
        self._values = value_states.new_empty((*value_states.shape[:2], self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions; {end} were asked for")
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a preallocated generation cache is never cropped")

    def reset(self) -> None:
        self.length = 0
        self.keys = self.values = None
        self.is_initialized = False


def preallocated_cache(model, capacity: int) -> Cache | None:
    """A cache for greedy decoding of up to `capacity` positions (prompt and answer) per row.

    None (the model makes its own) for a model with sliding-window or other non-full attention
    layers, whose caches are not plain growing key/value tensors.
    """
    config = model.config.get_text_config()
    if getattr(config, "sliding_window", None) or any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return None
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(config.num_hidden_layers)])


def _stop_ids(model, tokenizer) -> list[int]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in ids + [tokenizer.eos_token_id] if i is not None})


@torch.inference_mode()
def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[Response]:
    """Greedy answers of one batch of encoded prompts with a KV cache; finished rows leave the batch."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        attention_mask[i, width - len(p) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    stop = torch.tensor(_stop_ids(model, tokenizer), device=device)
    was_training = model.training
    model.eval()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
    cache = preallocated_cache(model, width + max_new_tokens)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1)
    cache = out.cache
    answers: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    active = list(range(len(prompts)))  # original row of each row still in the batch
    next_position = position_ids[:, -1] + 1
    token = out.logits[:, -1, :].argmax(-1)  # (A,)
    for step in range(max_new_tokens):
        done_rows = []
        for row, value in zip(active, token.tolist()):
            answers[row].append(value)
        is_stop = torch.isin(token, stop)
        for k, row in enumerate(active):
            if bool(is_stop[k]):
                finished[row] = True
                done_rows.append(k)
        if step == max_new_tokens - 1 or len(done_rows) == len(active):
            break
        if done_rows:  # drop finished rows from the batch and the cache
            keep = torch.tensor([k for k in range(len(active)) if k not in set(done_rows)], device=device)
            active = [active[k] for k in keep.tolist()]
            cache.batch_select_indices(keep)
            attention_mask, next_position, token = attention_mask[keep], next_position[keep], token[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=-1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position[:, None], cache=cache, use_cache=True)
        cache = out.cache
        next_position = next_position + 1
        token = out.logits[:, -1, :].argmax(-1)
    model.train(was_training)
    stop_set = set(stop.tolist())
    return [
        Response(ids, tokenizer.decode([t for t in ids if t not in stop_set], skip_special_tokens=True).strip(), done) for ids, done in zip(answers, finished)
    ]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], decoding: Decoding, seed: int = 0) -> list[Response]:
    """Answer one batch of already-encoded prompts (any lengths; they are left-padded here)."""
    if not decoding.do_sample:
        return greedy_generate(model, tokenizer, prompts, decoding.max_new_tokens)
    return hf_generate(model, tokenizer, prompts, decoding, seed)


@torch.no_grad()
def hf_generate(model, tokenizer, prompts: list[list[int]], decoding: Decoding, seed: int = 0) -> list[Response]:
    """The same through `model.generate` (sampling, and the reference the greedy loop is tested against)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        attention_mask[i, width - len(p) :] = 1
    stop = _stop_ids(model, tokenizer)
    sampling = {"do_sample": True, "temperature": decoding.temperature, "top_p": decoding.top_p} if decoding.do_sample else {"do_sample": False}
    if decoding.do_sample:
        torch.manual_seed(seed)  # each batch seeds itself, so a resumed run samples the same answers
    was_training = model.training
    model.eval()
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=decoding.max_new_tokens,
        eos_token_id=stop,
        pad_token_id=pad,
        top_k=None,
        **sampling,
    )
    model.train(was_training)
    responses = []
    for row in output[:, width:].tolist():
        ids, finished = [], False
        for token in row:
            ids.append(token)
            if token in stop:
                finished = True
                break
        text = tokenizer.decode([t for t in ids if t not in stop], skip_special_tokens=True).strip()
        responses.append(Response(ids, text, finished))
    return responses


def batched(items: list, size: int) -> Iterator[tuple[int, list]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def generate_all(
    model,
    tokenizer,
    prompts: list[list[int]],
    decoding: Decoding,
    batch_size: int,
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[Response]:
    """Answer many prompts; batches are formed from length-sorted prompts to waste little padding."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Response | None] = [None] * len(prompts)
    total = -(-len(prompts) // batch_size)
    for number, (start, chunk) in enumerate(batched(order, batch_size), start=1):
        answers = generate(model, tokenizer, [prompts[i] for i in chunk], decoding, seed=seed + start)
        for i, answer in zip(chunk, answers):
            results[i] = answer
        if on_batch:
            on_batch(number, total)
    return results  # type: ignore[return-value]
