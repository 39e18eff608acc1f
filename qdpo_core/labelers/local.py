"""A labeler backed by a chat model loaded in this process (by default the job's own FP model).

    labeler = LocalLabeler(model, tokenizer, "smollm2-135m-instruct")
    [choice] = labeler.choose([[{"role": "user", "content": "Is 2+2=4? Answer Yes or No."}]], ("Yes", "No"))
    choice.probs  # e.g. [0.83, 0.17]: softmax over the log-probs of the first reply token being Yes / No

Scoring is one forward pass per batch: only the next-token distribution after the assistant
header is needed (`logits_to_keep=1`), so no (B, T, V) logits tensor is ever built.
"""

from __future__ import annotations

import torch

from qdpo_core.generate import Decoding, generate
from qdpo_core.labelers.base import Choice, from_logprobs
from qdpo_core.tokens import collate, encode_prompt, encode_response, token_logps

# Labeler prompts hold whole responses; they are cut (from the left) only beyond this.
MAX_LABELER_PROMPT_TOKENS = 4096


class LocalLabeler:
    def __init__(self, model, tokenizer, name: str, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.description = f"local model {name}"
        self.device = next(model.parameters()).device

    def _encode(self, conversation: list[dict]) -> list[int]:
        return encode_prompt(self.tokenizer, conversation, MAX_LABELER_PROMPT_TOKENS).ids

    def choice_token_ids(self, choice: str) -> list[int]:
        """Every single token that spells `choice` at the start of a reply ("Yes" and " Yes" are both a yes)."""
        ids = set()
        for variant in (choice, " " + choice, choice.lower(), choice.capitalize()):
            tokens = self.tokenizer(variant, add_special_tokens=False)["input_ids"]
            if len(tokens) == 1:
                ids.add(tokens[0])
        if not ids:
            raise ValueError(f"choice {choice!r} is not a single token of this tokenizer; use short choices such as '1' and '2'")
        return sorted(ids)

    @torch.no_grad()
    def choose(self, conversations: list[list[dict]], choices: tuple[str, ...]) -> list[Choice]:
        token_sets = [torch.tensor(self.choice_token_ids(c), device=self.device) for c in choices]
        verdicts: list[Choice] = []
        for start in range(0, len(conversations), self.batch_size):
            prompts = [self._encode(c) for c in conversations[start : start + self.batch_size]]
            logps = self._next_token_logps(prompts)  # (B, V)
            for row in logps:
                verdicts.append(from_logprobs([float(torch.logsumexp(row[ids], 0)) for ids in token_sets]))
        return verdicts

    def _next_token_logps(self, prompts: list[list[int]]) -> torch.Tensor:
        """Log-probs of the token after each prompt → (B, V). Left-padded, with positions counted from each prompt's start."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention_mask[i, width - len(p) :] = 1
        # without explicit positions a left-padded row would start at position `padding`, not 0
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        logits = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            position_ids=position_ids.to(self.device),
            logits_to_keep=1,
        ).logits[:, -1, :]  # (B, V)
        return torch.log_softmax(logits.float(), dim=-1)

    def reply(self, conversations: list[list[dict]], max_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[str]:
        decoding = Decoding(max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0)
        texts: list[str] = []
        for start in range(0, len(conversations), self.batch_size):
            prompts = [self._encode(c) for c in conversations[start : start + self.batch_size]]
            texts.extend(r.text for r in generate(self.model, self.tokenizer, prompts, decoding, seed=seed + start))
        return texts

    @torch.no_grad()
    def mean_token_logprobs(self, conversations: list[list[dict]], responses: list[str], finished: list[bool]) -> list[float]:
        """Mean log-prob per token of each response (its end-of-turn token included when it finished)."""
        scores: list[float] = []
        for start in range(0, len(conversations), self.batch_size):
            prompts = [self._encode(c) for c in conversations[start : start + self.batch_size]]
            answers = [
                encode_response(self.tokenizer, text, MAX_LABELER_PROMPT_TOKENS, done).ids or [self.tokenizer.eos_token_id]
                for text, done in zip(responses[start : start + self.batch_size], finished[start : start + self.batch_size])
            ]
            batch = collate(prompts, answers, self.tokenizer.pad_token_id).to(self.device)
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
            logps, mask = token_logps(logits, batch)  # (B, T-1)
            scores.extend((logps.sum(-1) / mask.sum(-1).clamp(min=1)).tolist())
        return scores
