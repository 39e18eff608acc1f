"""Shared fixtures: a tiny random Llama (with the bundled model's tokenizer) built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_model.py


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny_model import build_tiny_model

    cached = os.environ.get("QDPO_TEST_TINY_MODEL")
    return build_tiny_model(Path(cached) if cached else tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from qdpo_core.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)
