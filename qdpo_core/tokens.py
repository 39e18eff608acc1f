"""Token-level plumbing shared by generation, training and evaluation.

A training/eval sequence is `prompt_ids + response_ids`, where the prompt is the chat template
applied with the generation prompt, and the response ends with the end-of-turn token when the
answer finished. Losses and metrics only ever look at response positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Encoded:
    ids: list[int]
    truncated: bool


def encode_prompt(tokenizer, messages: list[dict], max_tokens: int) -> Encoded:
    """Chat-template a conversation; overly long prompts lose their beginning (the question is at the end)."""
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    if len(ids) > max_tokens:
        return Encoded(ids[-max_tokens:], True)
    return Encoded(ids, False)


def encode_response(tokenizer, text: str, max_tokens: int, finished: bool = True) -> Encoded:
    """Tokenize an answer; a finished answer ends with the end-of-turn token so the model learns to stop."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if finished:
        ids.append(tokenizer.eos_token_id)
    if len(ids) > max_tokens:
        return Encoded(ids[:max_tokens], True)
    return Encoded(ids, False)


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T) 1 where the token at t is a response token (predicted from t-1)

    def to(self, device) -> SequenceBatch:
        return SequenceBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> SequenceBatch:
    """Right-pad prompt+response sequences into one batch with a response mask."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    batch = len(prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    response_mask = torch.zeros((batch, width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, : len(p) + len(r)] = 1
        response_mask[i, len(p) : len(p) + len(r)] = 1
    return SequenceBatch(input_ids, attention_mask, response_mask)


def shifted(logits: torch.Tensor, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align next-token logits with the tokens they predict.

    Returns (logits (B, T-1, V), targets (B, T-1), mask (B, T-1)) where mask marks response tokens.
    """
    return logits[:, :-1, :], batch.input_ids[:, 1:], batch.response_mask[:, 1:].to(logits.dtype)


def token_logps(logits: torch.Tensor, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of each target under `logits` → (logps (B, T-1), mask (B, T-1))."""
    step_logits, targets, mask = shifted(logits, batch)
    return target_logps(step_logits, targets, mask), mask


def target_logps(step_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(target) per position, masked → (B, K). step_logits (B, K, V) predict targets (B, K)."""
    # cross_entropy is logsumexp + gather without materialising a (B, K, V) log-softmax
    logps = -torch.nn.functional.cross_entropy(step_logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return logps.view_as(targets) * mask


def scored_width(batch: SequenceBatch) -> int:
    """How many final positions a forward pass must return logits for to score every response token.

    Right-padded rows: row i's first response token sits at its prompt length p_i and is predicted
    by position p_i − 1, so the last T − (min p_i − 1) positions cover every row. Length-sorted
    batches keep the prompts, and so this window, tight.
    """
    has_response = batch.response_mask.any(dim=1)
    if not bool(has_response.any()):
        return 1
    first = batch.response_mask.float().argmax(dim=1)[has_response]  # prompt length of each row
    return int(batch.input_ids.shape[1] - (int(first.min()) - 1))


def response_logits(model, batch: SequenceBatch, keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token logits only where they predict response tokens (the LM head skips the prompt).

    Returns (logits (B, K-1, V), targets (B, K-1), mask (B, K-1)) over the last K positions, the same
    alignment `shifted` gives for the full sequence. Pass `keep` to align two models on one window.
    """
    keep = keep or scored_width(batch)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, logits_to_keep=keep).logits  # (B, K, V)
    start = batch.input_ids.shape[1] - keep + 1
    return logits[:, :-1, :], batch.input_ids[:, start:], batch.response_mask[:, start:].to(logits.dtype)


def sequence_logps(model, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-prob per sequence and response length → ((B,), (B,))."""
    logits, targets, mask = response_logits(model, batch)
    return target_logps(logits, targets, mask).sum(-1), mask.sum(-1)
