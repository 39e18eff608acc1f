"""Checkpoints name the base model by its name and never ask the Hub about it."""

import json

import peft.utils.save_and_load as peft_save
import torch

from qdpo_core.checkpoint import save_checkpoint
from qdpo_core.config import QuantSpec, TrainSpec
from qdpo_core.quantize import load_quantized
from qdpo_core.train import make_policy


def test_a_checkpoint_names_its_base_and_makes_no_hub_lookup(tiny_model_dir, tmp_path, monkeypatch):
    student, _ = load_quantized(tiny_model_dir, QuantSpec(method="rtn", bits=4, group_size=32), "cpu")
    student.name_or_path = "tiny-registered"  # a registered name: no directory of that name exists, nor a hub repo
    policy = make_policy(student, TrainSpec(), seed=0)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    lookups = []
    real = peft_save.check_file_exists_on_hf_hub
    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", lambda *a, **k: lookups.append(a) or real(*a, **k))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # were a lookup made anyway, it must not reach the network

    path = save_checkpoint(tmp_path, 1, policy, optimizer, scheduler, {"step": 1})
    assert lookups == []  # peft asks the Hub whether the base's vocabulary changed unless told it did not
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-registered"
    assert str(tiny_model_dir) not in (path / "adapter_config.json").read_text()
