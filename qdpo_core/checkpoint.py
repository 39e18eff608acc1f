"""Training checkpoints: everything needed to continue exactly where a run stopped.

    step-000012/
        adapter_config.json, adapter_model.safetensors   the LoRA weights (PEFT format)
        optimizer.pt, scheduler.pt, rng.pt                optimizer moments, LR schedule, RNG streams
        trainer_state.json                                step, epoch, position, history, best so far

A checkpoint is written to a temporary directory and renamed into place, so a crash leaves either
the whole checkpoint or none. Resuming from one reaches the same final adapter as never stopping.
Optimizer and RNG files hold only tensors and numbers and are read with `weights_only=True`.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def save_checkpoint(root: Path, step: int, policy, optimizer, scheduler, state: dict, keep: int = 2) -> Path:
    target = checkpoint_dir(root, step)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # The base's embeddings are frozen and never resized, so the adapter never carries them; saying so
    # also keeps peft from looking the base's name (a registered name, not a hub id) up on the Hub at every save.
    policy.save_pretrained(tmp, save_embedding_layers=False)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    _prune(root, keep)
    return target


def latest_checkpoint(root: Path) -> Path | None:
    steps = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return max(steps)[1] if steps else None


def load_adapter_weights(policy, directory: Path) -> None:
    """Put a saved adapter's weights into `policy` in place; every trained weight of the policy must be
    in the file (PEFT alone would leave a missing one, such as a DoRA magnitude, as it was)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(directory / "adapter_model.safetensors")
    missing = sorted(set(get_peft_model_state_dict(policy, save_embedding_layers=False)) - set(weights))
    if missing:
        raise ValueError(
            f"the adapter in {directory.name} lacks {len(missing)} of the model's adapter weights, e.g. {missing[0]}: it was saved with other train settings"
        )
    set_peft_model_state_dict(policy, weights)


def load_checkpoint(path: Path, policy, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, schedule and RNG in place; return the trainer state."""
    load_adapter_weights(policy, path)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / STATE_FILE).read_text())


def copy_adapter(source: Path, target: Path) -> None:
    """Copy just the PEFT adapter files (what users download), atomically."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(source / name, tmp / name)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _prune(root: Path, keep: int) -> None:
    steps = sorted((int(m.group(1)), p) for p in root.glob("step-*") if (m := _STEP_DIR.match(p.name)))
    for _, path in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
