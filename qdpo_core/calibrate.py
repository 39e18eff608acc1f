"""Training-free repair: start the LoRA adapter from the quantization error, not from zero.

A quantized linear layer computes with Q instead of the full-precision W; the residual is R = W − Q.
LoRA adds s·B·A (s = lora_alpha / r, PEFT's `scaling`), so a rank-r adapter can absorb part of R
before any gradient step. What matters is not R itself but its effect on real inputs: for
calibration activations X (tokens × in) entering the layer in the FP model, the output error is
X (R − sBA)ᵀ. Its exact rank-r least-squares minimiser (CLoQ 2025, EoRA 2024, QuAILoRA 2024):

    H  = XᵀX / n + λ·mean(diag)·I        the damped Gram matrix of the inputs (in × in)
    H  = V Λ Vᵀ,  S = V Λ^½ Vᵀ             symmetric square root (eigh: H is symmetric PSD)
    R·S = U Σ Pᵀ (truncated to rank r)     the residual seen through the inputs
    sBA = U_r Σ_r P_rᵀ S⁻¹                 un-whitened; split as B = U_r Σ_r^½, A = Σ_r^½ P_rᵀ S⁻¹

Inits (`train.init`):
    identity    PEFT's own: B = 0, the adapter starts as the PTQ-only model
    svd         truncated SVD of R (H = I): cheap, ignores which input directions matter
    calibrated  the whitened form above; where the full Gram matrix would not fit
                (`train.init_max_full_gram_dim`) or is numerically unusable, its diagonal
                (per-channel RMS of the inputs), which is exact for uncorrelated channels

The inputs X are captured with forward hooks on the FP teacher, on the job's own training prompts
with the FP model's greedy answers (never the held-out split). Layers that read the same tensor
(q/k/v, gate/up in a Llama block) share one Gram matrix and one eigendecomposition.
A sequential variant (inputs from the already-corrected quantized model, targets the FP outputs)
was measured on SmolLM2-135M at RTN 3-bit and did no better (flip 33.6% vs 33.3%), so it is not offered.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qdpo_core.config import INITS  # the spec owns the names: identity, svd, calibrated
from qdpo_core.tokens import SequenceBatch

__all__ = ["INITS", "InitResult", "dequantized_weight", "initialise_adapter", "low_rank_factors", "whitening"]


@dataclass
class InitResult:
    """What initialising the adapter did (recorded in the stage summary, the report and the manifest)."""

    init: str
    rank: int
    layers: int = 0
    full_gram_layers: int = 0  # layers whitened with the full Gram matrix
    diagonal_layers: int = 0  # layers that fell back to the diagonal form
    calibration_sequences: int = 0
    calibration_tokens: int = 0
    seconds: float = 0.0
    peak_gram_bytes: int = 0  # memory the Gram matrices took at once
    relative_error: float | None = None  # mean over layers of ‖X(R − sBA)ᵀ‖ / ‖XRᵀ‖ on the calibration data
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# ---- what a quantized layer computes with -----------------------------------------------------


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight a (possibly quantized) linear layer multiplies its input by, as float32 (out, in).

    bitsandbytes 4-bit (nf4 / fp4): its own de-quantization, exactly what its matmul uses.
    bitsandbytes int8 (LLM.int8): the row-wise de-quantized int8 weight (its activations are also
    quantized at run time, which no weight correction can represent).
    nn.Linear (RTN fake-quant, or no quantization): the weight itself.
    """
    base: Any = getattr(module, "base_layer", module)  # a PEFT LoRA wrapper holds the quantized layer
    kind = type(base).__module__
    if kind.startswith("bitsandbytes"):
        import bitsandbytes.functional as bnb_functional

        weight = base.weight
        if getattr(weight, "quant_state", None) is not None:  # Params4bit
            return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
        scales = getattr(weight, "SCB", None)
        if scales is None:  # after the first forward pass the scales live in the layer's state
            scales = getattr(getattr(base, "state", None), "SCB", None)
        if weight.dtype == torch.int8 and scales is not None:
            return bnb_functional.int8_vectorwise_dequant(weight.data, scales).float()
        return weight.detach().float()
    return base.weight.detach().float()


# ---- the low-rank factors ---------------------------------------------------------------------


def whitening(gram: torch.Tensor, count: int, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S⁻¹) with S = H^½ of the damped, normalised Gram matrix H = gram / count + λI."""
    h = gram.double() / max(count, 1)
    lam = damping * torch.diagonal(h).mean().clamp(min=1e-12)
    h = h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    eigenvalues, eigenvectors = torch.linalg.eigh(h)
    eigenvalues = eigenvalues.clamp(min=float(lam) * 1e-3)
    root = (eigenvectors * eigenvalues.sqrt()) @ eigenvectors.T
    inverse_root = (eigenvectors / eigenvalues.sqrt()) @ eigenvectors.T
    return root, inverse_root


def _truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` singular triplets; exact for small matrices, randomized (torch.svd_lowrank) for large."""
    if min(matrix.shape) <= 2048:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    u, s, v = torch.svd_lowrank(matrix, q=min(rank + 16, min(matrix.shape)), niter=4)
    return u[:, :rank], s[:rank], v[:, :rank].T


def low_rank_factors(
    residual: torch.Tensor,
    rank: int,
    whiten: tuple[torch.Tensor, torch.Tensor] | None = None,
    channel_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out, r), A (r, in) with B·A the best rank-r approximation of `residual` (out, in).

    With `whiten` = (S, S⁻¹) the error is measured through the inputs, ‖(R − BA)·S‖ = ‖X(R − BA)ᵀ‖;
    with `channel_scale` d (in,) through the per-channel RMS only, ‖(R − BA)·diag(d)‖; with neither,
    plainly (‖R − BA‖, a truncated SVD of R).
    """
    rank = min(rank, *residual.shape)
    r = residual.double()
    if whiten is not None:
        root, inverse_root = whiten
        u, s, vh = _truncated_svd(r @ root, rank)
        return (u * s.sqrt()).float(), ((s.sqrt()[:, None] * vh) @ inverse_root).float()
    if channel_scale is not None:
        d = channel_scale.double().clamp(min=1e-8)
        u, s, vh = _truncated_svd(r * d, rank)
        return (u * s.sqrt()).float(), ((s.sqrt()[:, None] * vh) / d).float()
    u, s, vh = _truncated_svd(r, rank)
    return (u * s.sqrt()).float(), (s.sqrt()[:, None] * vh).float()


# ---- calibration activations ------------------------------------------------------------------


class GramCollector:
    """Accumulates XᵀX of the inputs of named linear layers over the real (non-padding) tokens.

    Layers fed the very same tensor object one after the other (q/k/v, gate/up) share one
    accumulator (`groups`); the last input is held until the next one arrives, so its memory cannot
    be reused by another tensor in between.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.model = model
        self.names = list(names)
        self.grams: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.groups: dict[str, str] = {}  # layer name -> name of the layer whose accumulator it shares
        self._keep: torch.Tensor | None = None
        self._last: tuple[torch.Tensor, str] | None = None
        self._hooks: list = []

    def __enter__(self) -> GramCollector:
        modules = dict(self.model.named_modules())
        for name in self.names:
            self._hooks.append(modules[name].register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *_exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _hook(self, name: str) -> Callable:
        def hook(_module, args):
            x = args[0]
            if self._last is not None and self._last[0] is x:
                self.groups.setdefault(name, self._last[1])
                return
            self._last = (x, name)
            self.groups.setdefault(name, name)
            flat = x.detach().reshape(-1, x.shape[-1])
            if self._keep is not None:
                flat = flat[self._keep]
            flat = flat.float()
            self.grams[name] = self.grams.get(name, 0) + flat.T @ flat  # (in, in)
            self.counts[name] = self.counts.get(name, 0) + flat.shape[0]

        return hook

    @torch.inference_mode()
    def run(self, batches: Iterable[SequenceBatch]) -> None:
        device = next(self.model.parameters()).device
        for batch in batches:
            batch = batch.to(device)
            self._keep = batch.attention_mask.reshape(-1).bool()
            self._last = None
            self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        self._keep = self._last = None

    def gram(self, name: str) -> tuple[torch.Tensor, int]:
        owner = self.groups.get(name, name)
        return self.grams[owner], self.counts[owner]


# ---- putting it into the adapter --------------------------------------------------------------


def lora_layers(policy: nn.Module, adapter: str = "default") -> dict[str, Any]:
    """The PEFT LoRA layers of `policy`, by the name their base layer has in the plain model.

    Typed Any: their per-adapter attributes (r, scaling, lora_A, lora_B) are looked up by name, which
    torch types as Tensor | Module.
    """
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in policy.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            layers[name.removeprefix("base_model.model.")] = module
    return layers


def set_lora_factors(layer: Any, b: torch.Tensor, a: torch.Tensor, adapter: str = "default") -> None:
    """Make the layer's adapter equal s·B·A = b·a (s = the layer's LoRA scaling), split evenly."""
    scaling = layer.scaling[adapter]
    root = math.sqrt(scaling)
    weight_a, weight_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    with torch.no_grad():
        weight_a.copy_((a / root).to(weight_a.dtype))
        weight_b.copy_((b / root).to(weight_b.dtype))


def initialise_adapter(
    policy: nn.Module,
    teacher: nn.Module,
    init: str,
    batches: list[SequenceBatch] | None = None,
    damping: float = 0.01,
    max_full_gram_dim: int = 8192,
    adapter: str = "default",
    on_layer: Callable[[int, int], None] | None = None,
) -> InitResult:
    """Set every LoRA layer of `policy` from its quantization error (see the module docstring).

    `teacher` is the FP model the quantized base came from (same module names); `batches` are the
    calibration sequences (needed by `calibrated`). Returns what was done, with timings.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}; got {init!r}")
    layers = lora_layers(policy, adapter)
    rank = next(iter(layers.values())).r[adapter] if layers else 0
    result = InitResult(init=init, rank=rank, layers=len(layers))
    if init == "identity" or not layers:
        return result
    started = time.monotonic()
    teacher_modules = dict(teacher.named_modules())
    missing = sorted(set(layers) - set(teacher_modules))
    if missing:
        raise ValueError(f"the FP model has no layers named {missing[:3]}; it is not the model the quantized base was made from")
    collector = None
    if init == "calibrated":
        if not batches:
            raise ValueError("init 'calibrated' needs calibration batches")
        collector = GramCollector(teacher, layers)
        with collector:
            collector.run(batches)
        result.calibration_sequences = sum(int(b.input_ids.shape[0]) for b in batches)
        result.calibration_tokens = int(sum(int(b.attention_mask.sum()) for b in batches))
        result.peak_gram_bytes = sum(g.numel() * g.element_size() for g in collector.grams.values())
        result.timings["activations_seconds"] = round(time.monotonic() - started, 2)
    factor_started = time.monotonic()
    whitenings: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
    errors = []
    for number, (name, layer) in enumerate(layers.items(), start=1):
        w = teacher_modules[name].weight.detach().float()
        q = dequantized_weight(layer).to(w.device)
        residual = w - q  # (out, in)
        whiten = scale = None
        if collector is not None:
            gram, count = collector.gram(name)
            owner = collector.groups.get(name, name)
            if gram.shape[0] <= max_full_gram_dim:
                if owner not in whitenings:
                    try:
                        whitenings[owner] = whitening(gram, count, damping)
                    except RuntimeError:  # eigh did not converge: fall back to the diagonal
                        whitenings[owner] = None
                whiten = whitenings[owner]
            if whiten is None:
                scale = (torch.diagonal(gram) / max(count, 1)).sqrt()
                result.diagonal_layers += 1
            else:
                result.full_gram_layers += 1
        b, a = low_rank_factors(residual, rank, whiten=whiten, channel_scale=scale)
        set_lora_factors(layer, b.to(layer.lora_B[adapter].weight.device), a.to(layer.lora_A[adapter].weight.device), adapter)
        if collector is not None:
            gram, count = collector.gram(name)
            errors.append(_relative_output_error(residual, b @ a, gram))
        if on_layer is not None:
            on_layer(number, len(layers))
    result.timings["factors_seconds"] = round(time.monotonic() - factor_started, 2)
    result.seconds = round(time.monotonic() - started, 2)
    if errors:
        result.relative_error = round(sum(errors) / len(errors), 4)
    return result


def _relative_output_error(residual: torch.Tensor, correction: torch.Tensor, gram: torch.Tensor) -> float:
    """‖X(R − C)ᵀ‖ / ‖XRᵀ‖ computed from the Gram matrix: sqrt(tr(E H Eᵀ) / tr(R H Rᵀ))."""
    g = gram.double()
    r = residual.double()
    e = r - correction.double()
    before = torch.einsum("oi,ij,oj->", r, g, r)
    after = torch.einsum("oi,ij,oj->", e, g, e)
    return float((after / before.clamp(min=1e-30)).clamp(min=0).sqrt())
