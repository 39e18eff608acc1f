"""The trainer: DPO (sigmoid / hinge / IPO, optional NLL and KD terms) or pure KD, with LoRA on the
frozen quantized model.

Why a loop of our own rather than a library trainer: the reference model here *is* the quantized
base, so its log-probs are computed once (adapters disabled) and reused every epoch — no second
model in memory; checkpoints hold everything needed for an exact resume; and every checkpoint is
scored on held-out token-flip rate / KL to full precision, keeping the best. Training loss says
nothing about quality here (a too-high learning rate ruins the model while the DPO loss keeps
falling), so the exported adapter is the best held-out one and never worse than PTQ-only.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import cast

import torch

from qdpo_core import checkpoint as ckpt
from qdpo_core.config import TrainSpec
from qdpo_core.errors import Cancelled, SpecError
from qdpo_core.events import Emitter
from qdpo_core.losses import dpo_loss, kd_loss, nll_loss, top1_hinge
from qdpo_core.tokens import SequenceBatch, collate, response_logits, scored_width, target_logps

BUCKET_BATCHES = 8  # optimizer steps whose examples are sorted by length together (see Trainer.epoch_order)
# train.compile 'auto' compiles the decoder layers for runs of at least this many optimizer steps whose
# layers all have the same LoRA ranks (see uniform_layers). A cold compile of SmolLM2-135M's layer (forward
# and backward, dynamic shapes) took ~50 s on 2 cores (~18 s from inductor's on-disk cache); a compiled
# step took 29% less time in float32 in bench/train_throughput.py (26-30% less in bfloat16 in a probe), so
# it pays back within a few dozen steps.
COMPILE_MIN_STEPS = 48


def decoder_layers(model) -> torch.nn.ModuleList | None:
    """The model's list of transformer blocks (peft-wrapped or not), or None if it has none we know."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(inner, "model", None), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0 else None


class CompiledLayers:
    """`torch.compile`d copies of a model's decoder layers, swapped in only around training steps.

    One compiled graph (dynamic shapes) serves every layer and every batch shape, since the layers
    share their code. Generation and scoring between steps run the plain layers: their KV caches
    would only make the compiler recompile. A compiler that fails (no C++ compiler, an unsupported
    op) turns compilation off for the rest of the run; the step is redone eagerly.
    """

    def __init__(self, layers: torch.nn.ModuleList):
        self.layers, self.plain = layers, list(layers)
        self.compiled = [cast(torch.nn.Module, torch.compile(layer, dynamic=True)) for layer in self.plain]  # OptimizedModule
        self.enabled = True
        self.error: str | None = None

    def __enter__(self) -> CompiledLayers:
        if self.enabled:
            for i, layer in enumerate(self.compiled):
                self.layers[i] = layer
        return self

    def __exit__(self, *exc) -> None:
        for i, layer in enumerate(self.plain):
            self.layers[i] = layer

    def disable(self, error: BaseException) -> None:
        self.enabled, self.error = False, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]


def compile_errors() -> tuple[type[BaseException], ...]:
    """What a failing torch.compile raises at the first call (dynamo wraps the backend's errors)."""
    import torch._dynamo.exc as dynamo_exc

    errors: list[type[BaseException]] = [dynamo_exc.TorchDynamoException]
    try:
        from torch._inductor.exc import InductorError

        errors.append(InductorError)
    except ImportError:  # older torch: inductor errors arrive wrapped
        pass
    return tuple(errors)


def uniform_layers(model) -> torch.nn.ModuleList | None:
    """The decoder layers if every one has the same trainable shapes (one compiled graph serves them all), else None.

    Not so under the calibrated rank allocation, which gives each layer its own LoRA ranks: every
    distinct set of ranks would be a compile of its own (~10 s each here), more than the steps save.
    """
    layers = decoder_layers(model)
    if layers is None:
        return None
    shapes = {tuple((name, tuple(p.shape)) for name, p in layer.named_parameters() if p.requires_grad) for layer in layers}
    return layers if len(shapes) == 1 else None


def should_compile(spec: TrainSpec, total_steps: int) -> bool:
    return spec.compile == "on" or (spec.compile == "auto" and total_steps >= COMPILE_MIN_STEPS)


@dataclass
class TrainResult:
    best_step: int
    best_metrics: dict
    best_dir: Path
    steps: int
    total_steps: int
    stopped_early: bool
    checkpoint_evals: list[dict]
    history: list[dict]
    compiled: bool = False  # the training steps ran torch.compile'd decoder layers

    def to_dict(self) -> dict:
        return {**self.__dict__, "best_dir": str(self.best_dir)}


@dataclass
class TrainState:
    """Where a training run stands; saved in every checkpoint (trainer_state.json) for an exact resume."""

    total_steps: int
    global_step: int = 0
    epoch: int = 0
    position: int = 0  # micro-batches of the current epoch already done
    finished: bool = False
    stopped_early: bool = False
    best_step: int = 0  # 0 = the starting adapter (PTQ-only with an identity init)
    best_metrics: dict = field(default_factory=dict)
    evals_without_improvement: int = 0
    checkpoint_evals: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def make_policy(student, spec: TrainSpec, seed: int, base_model_name: str | None = None, ranks: dict[str, int] | None = None):
    """Wrap the frozen quantized model with fresh LoRA adapters (seeded; B = 0, the identity).

    `base_model_name` is what the saved adapter_config.json names as its base (the model's registered
    name), never the directory it was loaded from. Unknown `target_modules` fail here with the names
    the model has, before any work is done. `ranks` (layer name → rank, from the calibrated rank
    allocation) overrides `lora_rank` per layer, with lora_alpha scaled alike so every layer keeps
    the scaling alpha / r; layers given rank 0 get no adapter.
    """
    import re
    import warnings

    from peft import LoraConfig, get_peft_model

    check_target_modules(student, spec.target_modules)
    assert spec.lora_alpha is not None  # TrainSpec sets it (2 × rank when left empty)
    torch.manual_seed(seed)
    ranks = ranks or {}
    # PEFT reads pattern keys as regular expressions matched at the end of a module's name
    rank_pattern = {re.escape(name): r for name, r in ranks.items() if r > 0 and r != spec.lora_rank}
    config = LoraConfig(
        r=spec.lora_rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=spec.target_modules,
        exclude_modules=sorted(name for name, r in ranks.items() if r == 0) or None,
        rank_pattern=rank_pattern,
        alpha_pattern={name: spec.lora_alpha * r / spec.lora_rank for name, r in rank_pattern.items()},
        modules_to_save=norm_module_names(student) if spec.train_norms else None,
        use_dora=spec.dora,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks a deprecated transformers property
        policy = get_peft_model(student, config)
    if base_model_name is not None:
        policy.peft_config["default"].base_model_name_or_path = base_model_name
    return policy


def norm_module_names(model) -> list[str]:
    """The last name part of every normalisation layer with a scale (input_layernorm, norm, …)."""
    names = set()
    for name, module in model.named_modules():
        if name and "norm" in type(module).__name__.lower() and isinstance(getattr(module, "weight", None), torch.nn.Parameter):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def linear_module_names(model) -> list[str]:
    """The last name part of every linear layer LoRA can wrap (q_proj, up_proj, …), output head excluded."""
    from qdpo_core.quantize import SKIP_MODULES

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith(SKIP_MODULES):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def target_layer_names(model, target_modules) -> list[str]:
    """Full names of the layers `target_modules` selects, as PEFT matches them (all-linear: every
    linear layer but the output head; a list: names equal to, or ending in '.' + , an entry)."""
    from qdpo_core.quantize import SKIP_MODULES

    # bitsandbytes' Linear4bit and Linear8bitLt subclass nn.Linear
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and not name.endswith(SKIP_MODULES)]
    if target_modules == "all-linear":
        return linear
    return [name for name in linear if any(name == t or name.endswith("." + t) for t in target_modules)]


def check_target_modules(model, target_modules) -> None:
    """Every named target must match a linear layer of the model (PEFT matches by name suffix)."""
    if target_modules == "all-linear":
        return
    available = linear_module_names(model)
    module_names = [name for name, _ in model.named_modules()]
    for i, target in enumerate(target_modules):
        if not any(name == target or name.endswith("." + target) for name in module_names):
            raise SpecError(
                f"train.target_modules[{i}]: the model has no layer named {target!r}; use 'all-linear' or names from: {', '.join(available)}",
                param="train.target_modules",
            )


def make_optimizer(policy, spec: TrainSpec) -> torch.optim.Optimizer:
    """AdamW over the trained weights; with LoRA+ (lora_plus_ratio > 1) B and any trained norm scale learn that many times faster than A."""
    if spec.lora_plus_ratio > 1:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(
            policy, torch.optim.AdamW, lr=spec.learning_rate, loraplus_lr_ratio=spec.lora_plus_ratio, loraplus_weight_decay=spec.weight_decay
        )
    return torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=spec.learning_rate, weight_decay=spec.weight_decay)


def reset_to_identity(policy, seed: int) -> None:
    """Put every LoRA layer back to PEFT's own start (seeded A, B = 0): the adapter adds nothing."""
    from peft.tuners.lora import LoraLayer

    from qdpo_core.calibrate import match_dora_magnitude

    torch.manual_seed(seed)
    for module in policy.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.lora_A:
                module.reset_lora_parameters(adapter, True)
                match_dora_magnitude(module, adapter)


class Trainer:
    def __init__(
        self,
        policy,
        teacher,
        tokenizer,
        examples: list[dict],
        spec: TrainSpec,
        objective: str,  # "dpo" or "kd"
        workdir: Path,
        evaluate: Callable[[object], dict] | None,
        baseline: dict,  # held-out metrics of the PTQ-only model (step 0)
        emitter: Emitter,
        should_cancel: Callable[[], bool] = lambda: False,
        seed: int = 0,
        max_new_tokens: int = 64,  # on-policy distillation: cap on the model's own answers
        teacher_cache_bytes: int = 2 << 30,  # FP logits kept for reuse across epochs
    ):
        self.policy, self.teacher, self.tokenizer = policy, teacher, tokenizer
        self.examples, self.spec, self.objective = examples, spec, objective
        self.workdir, self.evaluate, self.baseline = workdir, evaluate, baseline
        self.emitter, self.should_cancel, self.seed = emitter, should_cancel, seed
        self.device = next(policy.parameters()).device
        self.pad_id = tokenizer.pad_token_id
        self.checkpoints = workdir / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.best_dir = workdir / "best"
        micro_batches = math.ceil(len(examples) / spec.batch_size)
        self.steps_per_epoch = math.ceil(micro_batches / spec.gradient_accumulation_steps)
        self.total_steps = self.steps_per_epoch * spec.epochs
        self.uses_teacher = objective == "kd" or spec.kd_weight > 0
        self.max_new_tokens = max_new_tokens
        self.on_policy: dict[int, list[int]] = {}  # example index -> the model's own answer, this epoch
        self.teacher_cache: dict[int, torch.Tensor] = {}  # example index -> FP logits on its answer (N_i, V)
        self.teacher_cache_bytes, self.teacher_cache_used = teacher_cache_bytes, 0

    # ---- data -------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> list[list[int]]:
        """Micro-batches of example indices; the shuffle depends only on (seed, epoch) so resume sees the same order.

        Examples are shuffled, then sorted by length within windows of BUCKET_BATCHES optimizer
        steps, so a step holds sequences of similar length (little padding); the steps are shuffled
        again, so the order of lengths is random too. A step's examples do not depend on how it is
        split into micro-batches (gradient accumulation gives the same groups).
        """
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.examples), generator=generator).tolist()
        size, accumulation = self.spec.batch_size, self.spec.gradient_accumulation_steps
        step = size * accumulation
        window = step * BUCKET_BATCHES
        bucketed = [i for start in range(0, len(order), window) for i in sorted(order[start : start + window], key=self._length)]
        steps = [bucketed[i : i + step] for i in range(0, len(bucketed), step)]
        shuffled = [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]
        return [group[i : i + size] for group in shuffled for i in range(0, len(group), size)]

    def _length(self, index: int) -> int:
        example = self.examples[index]
        return len(example["prompt_ids"]) + max(len(example.get("chosen_ids", ())), len(example.get("rejected_ids", ())))

    def reference_logps(self) -> dict[str, list[float]]:
        """Log-probs of chosen and rejected answers under the starting model, computed once.

        The reference is the model being improved as training starts: the quantized base with the
        initialised adapter (for init 'identity', the PTQ-only model). It is called before any
        checkpoint is loaded, so the policy holds exactly the starting weights.
        """
        path = self.workdir / "reference_logps.json"
        if path.is_file():
            return json.loads(path.read_text())
        result = {"chosen": [0.0] * len(self.examples), "rejected": [0.0] * len(self.examples)}
        batches = [list(range(i, min(i + self.spec.batch_size, len(self.examples)))) for i in range(0, len(self.examples), self.spec.batch_size)]
        self.policy.eval()
        with torch.no_grad():
            for number, indices in enumerate(batches, start=1):
                for side in ("chosen", "rejected"):
                    batch = collate([self.examples[i]["prompt_ids"] for i in indices], [self.examples[i][f"{side}_ids"] for i in indices], self.pad_id).to(
                        self.device
                    )
                    logits, targets, mask = response_logits(self.policy, batch)
                    for i, value in zip(indices, target_logps(logits, targets, mask).sum(-1).tolist()):
                        result[side][i] = value
                self.emitter.progress(number, len(batches), f"reference log-probs {number}/{len(batches)}")
        self.policy.train()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)
        return result

    def on_policy_answers(self, epoch: int) -> dict[int, list[int]]:
        """GKD-style on-policy data: for a seeded share of the examples, the model's own greedy answer
        at the start of `epoch` (scored by the teacher in the KD loss). Written once per epoch, so a
        resumed run trains on the same sequences."""
        fraction = self.spec.kd_on_policy_fraction
        if self.objective != "kd" or fraction <= 0:
            return {}
        path = self.workdir / "on_policy" / f"epoch-{epoch:03d}.json"
        if path.is_file():
            return {int(k): v for k, v in json.loads(path.read_text()).items()}
        from qdpo_core.generate import Decoding, generate_all

        generator = torch.Generator().manual_seed(self.seed * 7_919 + epoch)
        count = max(1, round(fraction * len(self.examples)))
        chosen = sorted(torch.randperm(len(self.examples), generator=generator)[:count].tolist())
        prompts = [self.examples[i]["prompt_ids"] for i in chosen]
        answers = generate_all(self.policy, self.tokenizer, prompts, Decoding(max_new_tokens=self.max_new_tokens), self.spec.batch_size * 2)
        self.policy.train()
        result = {i: a.ids for i, a in zip(chosen, answers) if a.ids}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)
        self.emitter.log(f"epoch {epoch + 1}: {len(result)} of {len(self.examples)} distillation sequences are the model's own answers (on-policy)")
        return result

    # ---- one micro-batch --------------------------------------------------------------
    def batch_loss(self, indices: list[int], reference: dict | None) -> tuple[torch.Tensor, dict]:
        ex = [self.examples[i] for i in indices]
        prompts = [e["prompt_ids"] for e in ex]
        if self.objective == "kd":
            answers = [self.on_policy.get(i, e["chosen_ids"]) for i, e in zip(indices, ex)]
            batch = collate(prompts, answers, self.pad_id).to(self.device)
            if self.spec.kd_positions == "all":  # every real token after the first is predicted and matched, prompt included
                matched = batch.attention_mask.clone()
                matched[:, 0] = 0
                batch = SequenceBatch(batch.input_ids, batch.attention_mask, matched)
            keep = scored_width(batch)
            logits, _, mask = response_logits(self.policy, batch, keep)  # (B, K-1, V): the matched positions only
            cacheable = [i not in self.on_policy for i in indices]  # the model's own answers change every epoch
            loss = self._kd_term(logits, mask, batch, keep, indices if all(cacheable) else None)
            return loss, {"loss": loss.item(), "kd_loss": loss.item()}
        # Chosen and rejected go through one forward pass: (2B, T).
        batch = collate(prompts + prompts, [e["chosen_ids"] for e in ex] + [e["rejected_ids"] for e in ex], self.pad_id).to(self.device)
        keep = scored_width(batch)
        logits, targets, mask = response_logits(self.policy, batch, keep)  # (2B, K-1, V)
        logps = target_logps(logits, targets, mask)
        sums, lengths = logps.sum(-1), mask.sum(-1)
        n = len(ex)
        assert reference is not None  # the DPO objective always has the reference log-probabilities
        ref = torch.tensor([[reference["chosen"][i] for i in indices], [reference["rejected"][i] for i in indices]], device=self.device)
        policy_c, policy_r, ref_c, ref_r = sums[:n], sums[n:], ref[0], ref[1]
        if self.spec.loss == "ipo":  # IPO is defined on per-token average log-ratios
            policy_c, policy_r = policy_c / lengths[:n], policy_r / lengths[n:]
            ref_c, ref_r = ref_c / lengths[:n], ref_r / lengths[n:]
        losses, chosen_rewards, rejected_rewards = dpo_loss(policy_c, policy_r, ref_c, ref_r, self.spec.beta, self.spec.loss)
        loss = losses.mean()
        stats = {
            "dpo_loss": loss.item(),
            "chosen_reward": chosen_rewards.mean().item(),
            "rejected_reward": rejected_rewards.mean().item(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        }
        if self.spec.nll_weight > 0:
            nll = nll_loss(sums[:n], lengths[:n])
            loss = loss + self.spec.nll_weight * nll
            stats["nll_loss"] = nll.item()
        if self.spec.kd_weight > 0:  # on the chosen (FP) answers: the first n rows, same window
            chosen = SequenceBatch(batch.input_ids[:n], batch.attention_mask[:n], batch.response_mask[:n])
            kd = self._kd_term(logits[:n], mask[:n], chosen, keep, indices)
            loss = loss + self.spec.kd_weight * kd
            stats["kd_loss"] = kd.item()
        stats["loss"] = loss.item()
        return loss, stats

    def _kd_term(self, student_logits: torch.Tensor, mask: torch.Tensor, batch: SequenceBatch, keep: int, indices: list[int] | None) -> torch.Tensor:
        """The KD divergence on `batch`'s answer positions; student_logits come from the same window `keep`.

        The teacher's logits on an example's FP answer never change, so they are computed once and
        reused in later epochs while they fit in `teacher_cache_bytes` (`indices` names the examples;
        None for sequences that cannot be cached, such as the model's own on-policy answers).
        """
        selected = mask.bool()  # (B, K-1): the answer positions, row by row
        rows = [int(n) for n in selected.sum(-1).tolist()]
        if indices is not None and all(i in self.teacher_cache for i in indices):
            teacher = torch.cat([self.teacher_cache[i] for i in indices])  # (N, V) in the same row-major order
        else:
            with torch.no_grad():  # not inference_mode: its tensors could not be saved for the student's backward pass
                teacher_logits, _, _ = response_logits(self.teacher, batch, keep)
            teacher = teacher_logits[selected]  # (N, V)
            if indices is not None:
                for i, part in zip(indices, torch.split(teacher, rows)):
                    if self.teacher_cache_used + part.numel() * part.element_size() <= self.teacher_cache_bytes:
                        self.teacher_cache[i] = part.clone()
                        self.teacher_cache_used += part.numel() * part.element_size()
        ones = torch.ones(teacher.shape[0], device=teacher.device)
        student = student_logits[selected]
        loss = kd_loss(student, teacher, ones, self.spec.kd_objective)
        if self.spec.kd_top1_weight > 0:
            loss = loss + self.spec.kd_top1_weight * top1_hinge(student, teacher)
        return loss

    # ---- the loop ---------------------------------------------------------------------
    def run(self) -> TrainResult:
        from transformers import get_scheduler

        spec = self.spec
        reference = self.reference_logps() if self.objective == "dpo" else None
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = make_optimizer(self.policy, spec)
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=int(spec.warmup_ratio * self.total_steps), num_training_steps=self.total_steps)
        state = self._initial_state()
        latest = ckpt.latest_checkpoint(self.checkpoints)
        if latest is not None:
            state = TrainState.from_dict(ckpt.load_checkpoint(latest, self.policy, optimizer, scheduler))
            self.emitter.log(f"resuming training from checkpoint at step {state.global_step}", step=state.global_step)
        elif not (self.best_dir / "adapter_model.safetensors").is_file():
            # Step 0 = the starting adapter (initialised, or the identity): the floor the export never goes below.
            self.policy.save_pretrained(self.best_dir, save_embedding_layers=False)
        self.policy.train()
        compiled = None
        if should_compile(spec, self.total_steps) and not state.finished:
            layers = uniform_layers(self.policy)
            if layers is not None:
                compiled = CompiledLayers(layers)
                self.emitter.log(f"training steps run torch.compile'd decoder layers (train.compile: {spec.compile}); the first step includes the compile")
            elif spec.compile == "on":
                self.emitter.warn(
                    "train.compile: the layers' LoRA ranks differ (calibrated rank allocation), so each would compile apart"
                    " (or the model's decoder layers were not found); training with the plain layers"
                )
        step_times: list[float] = []
        while not state.finished:
            epoch, position = state.epoch, state.position
            micro_batches = self.epoch_order(epoch)
            self.on_policy = self.on_policy_answers(epoch)
            accumulation = spec.gradient_accumulation_steps
            while position < len(micro_batches):
                started = time.monotonic()
                group = micro_batches[position : position + accumulation]
                totals = self._accumulate(group, reference, compiled)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm) if spec.max_grad_norm > 0 else None
                optimizer.step()
                scheduler.step()
                position += len(group)
                state.global_step += 1
                state.epoch, state.position = epoch, position
                step = state.global_step
                step_times.append(time.monotonic() - started)
                record = {"step": step, "epoch": epoch + position / len(micro_batches), "learning_rate": scheduler.get_last_lr()[0], **totals}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                state.history.append(record)
                eta = (sum(step_times[-10:]) / len(step_times[-10:])) * (self.total_steps - step)
                self.emitter.emit(
                    "metrics",
                    f"step {step}/{self.total_steps} loss {record['loss']:.4f}",
                    step=step,
                    total=self.total_steps,
                    eta_seconds=round(eta, 1),
                    **{k: v for k, v in record.items() if k != "step"},
                )
                epoch_end = position >= len(micro_batches)
                if epoch_end:
                    state.epoch, state.position = epoch + 1, 0
                    state.finished = state.epoch >= spec.epochs
                due = epoch_end or (spec.checkpoint_every and step % spec.checkpoint_every == 0)
                if due:
                    self._checkpoint(state, optimizer, scheduler)
                    if state.finished:
                        break
                if self.should_cancel():
                    if not due:
                        self._save(state, optimizer, scheduler)
                    raise Cancelled(f"cancelled at training step {step}; checkpoint saved")
                if state.finished:
                    break
            if state.stopped_early:
                break
        return TrainResult(
            best_step=state.best_step,
            best_metrics=state.best_metrics,
            best_dir=self.best_dir,
            steps=state.global_step,
            total_steps=self.total_steps,
            stopped_early=state.stopped_early,
            checkpoint_evals=state.checkpoint_evals,
            history=state.history,
            compiled=compiled is not None and compiled.enabled,
        )

    def _accumulate(self, group: list[list[int]], reference: dict | None, compiled: CompiledLayers | None) -> dict[str, float]:
        """Forward and backward of one optimizer step's micro-batches; the gradients are left in the LoRA weights."""
        while True:
            self.policy.zero_grad(set_to_none=True)
            totals: dict[str, float] = {}
            try:
                for indices in group:
                    with compiled or contextlib.nullcontext():
                        loss, stats = self.batch_loss(indices, reference)
                        (loss / len(group)).backward()
                    for key, value in stats.items():
                        totals[key] = totals.get(key, 0.0) + value / len(group)
                return totals
            except compile_errors() as error:
                if compiled is None or not compiled.enabled:
                    raise
                compiled.disable(error)
                self.emitter.warn(f"torch.compile failed ({compiled.error}); training goes on with the plain layers")

    def _initial_state(self) -> TrainState:
        return TrainState(total_steps=self.total_steps, best_metrics=dict(self.baseline))

    def _save(self, state: TrainState, optimizer, scheduler) -> Path:
        return ckpt.save_checkpoint(self.checkpoints, state.global_step, self.policy, optimizer, scheduler, state.to_dict())

    def _checkpoint(self, state: TrainState, optimizer, scheduler) -> None:
        """Score the current adapter on held-out data, keep it if best, stop early if it keeps losing."""
        step = state.global_step
        is_best, metrics = False, {}
        if self.spec.select_best and self.evaluate is not None:
            metrics = self.evaluate(self.policy)
            key = self.spec.selection_metric
            if metrics[key] < state.best_metrics.get(key, math.inf):
                is_best = True
                state.best_step, state.best_metrics = step, metrics
                state.evals_without_improvement = 0
            else:
                state.evals_without_improvement += 1
            patience = self.spec.early_stopping_patience
            if patience and state.evals_without_improvement >= patience and not state.finished:
                state.finished = state.stopped_early = True
                self.emitter.warn(f"stopping early at step {step}: {key} has not improved for {patience} evaluations (best at step {state.best_step})")
            state.checkpoint_evals.append({"step": step, "metrics": metrics, "is_best": is_best})
        elif not self.spec.select_best:
            is_best = True
            state.best_step = step
        self.policy.train()
        path = self._save(state, optimizer, scheduler)
        if is_best:
            ckpt.copy_adapter(path, self.best_dir)
        summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        self.emitter.emit(
            "checkpoint",
            f"checkpoint at step {step}" + (f": {summary}" if summary else "") + (" (best so far)" if is_best and metrics else ""),
            step=step,
            total=self.total_steps,
            path=str(path.relative_to(self.workdir.parent)),
            metrics=metrics,
            is_best=is_best,
        )
