"""Response masking: losses and metrics see response tokens only."""

import torch

from qdpo_core.tokens import collate, encode_prompt, encode_response, token_logps


def test_collate_marks_only_response_positions():
    batch = collate([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch.response_mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]


def test_token_logps_ignore_prompt_and_padding():
    batch = collate([[1, 2]], [[3]], pad_id=0)  # sequence 1 2 3; only token 3 is a response token
    vocab = 5
    logits = torch.zeros(1, 3, vocab)
    logits[0, 0, 2] = 50.0  # a confident prompt prediction must not count
    logits[0, 1, 3] = torch.log(torch.tensor(3.0))  # p(3 | 1 2) = 3 / (3 + 4)
    logps, mask = token_logps(logits, batch)
    assert mask.tolist() == [[0.0, 1.0]]
    assert torch.allclose(logps.sum(), torch.log(torch.tensor(3 / 7)))


def test_prompt_truncation_keeps_the_end_and_is_reported(tokenizer):
    messages = [{"role": "user", "content": "word " * 200 + "final question?"}]
    full = encode_prompt(tokenizer, messages, 10_000)
    cut = encode_prompt(tokenizer, messages, 32)
    assert not full.truncated and cut.truncated
    assert cut.ids == full.ids[-32:]


def test_response_gets_end_of_turn_and_is_cut_with_notice(tokenizer):
    finished = encode_response(tokenizer, "Paris is the capital.", 100)
    assert finished.ids[-1] == tokenizer.eos_token_id and not finished.truncated
    unfinished = encode_response(tokenizer, "Paris is the capital.", 100, finished=False)
    assert unfinished.ids == finished.ids[:-1]
    cut = encode_response(tokenizer, "word " * 50, 8)
    assert cut.truncated and len(cut.ids) == 8
