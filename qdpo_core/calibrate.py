"""Training-free repair: start the LoRA adapter from the quantization error, not from zero.

A quantized linear layer computes with Q instead of the full-precision W; the residual is R = W − Q.
LoRA adds s·B·A (s = lora_alpha / r, PEFT's `scaling`), so a rank-r adapter can absorb part of R
before any gradient step. What matters is not R itself but its effect on real inputs: for
calibration activations X (tokens × in) entering the layer in the FP model, the output error is
X (R − sBA)ᵀ. Its exact rank-r least-squares minimiser (CLoQ 2025, EoRA 2024, QuAILoRA 2024):

    H  = XᵀX / n + λ·mean(diag)·I        the damped Gram matrix of the inputs (in × in)
    H  = S Sᵀ                              S = H^½ (V Λ^½ Vᵀ), or any S with S Sᵀ = H: the lower
                                           Cholesky factor gives the same B and A, and is cheap
    R·S = U Σ Pᵀ (truncated to rank r)     the residual seen through the inputs
    sBA = U_r Σ_r P_rᵀ S⁻¹                 un-whitened; split as B = U_r Σ_r^½, A = Σ_r^½ P_rᵀ S⁻¹

Output side (`train.init_output_weighting: gradient`, the default): not every output direction of a
layer matters equally to the model's answers. To second order, the KL(FP‖quantized) a weight error ΔW
adds is ½·tr(G ΔW H ΔWᵀ), H as above and G = E[g gᵀ] the Gram matrix of the loss gradients g at the
layer's output (the Fisher information, K-FAC's factorisation of it), with answer tokens sampled from
the FP model's own distribution on the calibration sequences. Whitening both sides,

    G = Tᵀ T (T = G^½ or a Cholesky factor's transpose, damped),  T·R·S = U Σ Pᵀ,  sBA = T⁻¹ U_r Σ_r P_rᵀ S⁻¹,

minimises that loss increase; with `none` the output side is the identity (T = I). Gradient Gram
matrices that would together exceed `GRADIENT_GRAM_BYTES` are kept as their diagonal.

Inits (`train.init`):
    identity    PEFT's own: B = 0, the adapter starts as the PTQ-only model
    svd         truncated SVD of R (H = I): cheap, ignores which input directions matter
    calibrated  the whitened form above; where the full Gram matrix would not fit
                (`train.init_max_full_gram_dim`) or is numerically unusable, its diagonal
                (per-channel RMS of the inputs), which is exact for uncorrelated channels

The inputs X are captured with forward hooks on the FP teacher, on the job's own training prompts
with the FP model's greedy answers (never the held-out split). Layers that read the same tensor
(q/k/v, gate/up in a Llama block) share one Gram matrix and one eigendecomposition.

Rank allocation (`train.rank_allocation`): `uniform` gives every layer rank r; `calibrated` keeps the
adapter's parameter count (Σ r·(in + out) over the layers) but spends it where the weighted residual
has the most energy: the i-th rank of a layer removes σᵢ² of it and costs in + out parameters, so
ranks go greedily to the largest σᵢ² / (in + out), up to 4·r in one layer (`train.max_layer_rank`). With the gradient weighting
σᵢ² estimates the loss each rank removes, the same unit in every layer; without it each layer's
error is taken relative to its own output ‖XWᵀ‖². Layers left with rank 0 get no adapter.

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

__all__ = [
    "INITS",
    "GradientGramCollector",
    "InitResult",
    "allocate_ranks",
    "collect_grams",
    "dequantized_weight",
    "factor_ladder",
    "initialise_adapter",
    "low_rank_factors",
    "plan_ranks",
    "whitening",
]


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
    output_weighting: str = "none"  # the output side: none, full (gradient Gram matrices) or diagonal
    gradient_draws: int = 0  # sampled answers whose loss gradients weighed the output side
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


def whitening(gram: torch.Tensor, count: int, damping: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(S, S⁻¹) with S·Sᵀ = H, the damped, normalised Gram matrix H = gram / count + λI; S⁻¹ is None
    where S is triangular (un-whitening then solves with S, cheaper than forming its inverse).

    S is H's lower Cholesky factor. Any S with S·Sᵀ = H gives the very same correction as the
    symmetric root H^½: S = H^½·Q for an orthogonal Q, so the weighted residual R·S = (R·H^½)·Q has
    the singular values of R·H^½ and its right singular vectors turned by Q, which un-whitening
    (·S⁻¹) turns back — the same B and A, up to the sign of each singular pair. Cholesky and a
    triangular solve cost a fraction of an eigendecomposition and the two products with its vectors
    (those take about 1 s for a 1536-wide Gram matrix in float64 on one core).
    Where Cholesky fails (not positive definite in float64), the symmetric root from eigh.
    """
    h = gram.double() / max(count, 1)
    lam = damping * torch.diagonal(h).mean().clamp(min=1e-12)
    h = h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        return factor, None
    eigenvalues, eigenvectors = torch.linalg.eigh(h)
    eigenvalues = eigenvalues.clamp(min=float(lam) * 1e-3)
    root = (eigenvectors * eigenvalues.sqrt()) @ eigenvectors.T
    inverse_root = (eigenvectors / eigenvalues.sqrt()) @ eigenvectors.T
    return root, inverse_root


def _truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top min(rank, *shape) singular triplets (U, σ, Vᵀ), largest first.

    Up to 2048 on the short side: exactly, from the eigendecomposition of the short side's Gram
    matrix (MᵀM or MMᵀ) in float64 — the same triplets as a full SVD to ~1e-10 where singular values
    are distinct, at half its cost or less for the layers here, since only the top ones are needed.
    Larger: randomized (torch.svd_lowrank, the top rank + 16)."""
    rank = min(rank, *matrix.shape)
    if min(matrix.shape) > 2048:
        u, s, v = torch.svd_lowrank(matrix, q=min(rank + 16, min(matrix.shape)), niter=4)
        return u[:, :rank], s[:rank], v.T[:rank]
    m = matrix.double()
    tall = m.shape[0] >= m.shape[1]
    values, vectors = torch.linalg.eigh(m.T @ m if tall else m @ m.T)  # ascending
    values, vectors = values.flip(0)[:rank].clamp(min=0), vectors.flip(1)[:, :rank]
    s = values.sqrt()
    inverse = torch.where(s > s[:1] * 1e-12, 1 / s, torch.zeros_like(s))  # a zero singular value: its pair adds nothing
    if tall:  # M = U Σ Vᵀ: V from MᵀM, U = M V / σ
        return (m @ vectors) * inverse, s, vectors.T
    return vectors, s, ((vectors.T @ m) * inverse[:, None])


Side = tuple[torch.Tensor, torch.Tensor | None] | torch.Tensor | None  # (S, S⁻¹) from `whitening`, a diagonal scale, or nothing


def _weigh(matrix: torch.Tensor, left: Side, right: Side) -> torch.Tensor:
    """T·M·S for the output-side weight T (left) and the input-side weight S (right).

    From `whitening`'s (S, S⁻¹) of a Gram matrix G = S·Sᵀ the output side is T = Sᵀ (so TᵀT = G and
    ‖T·E‖² = tr(Eᵀ G E)); the input side is S itself (‖E·S‖² = tr(E H Eᵀ)).
    """
    m = matrix.double()
    if isinstance(right, tuple):
        m = m @ right[0].to(m)
    elif right is not None:
        m = m * right.double().clamp(min=1e-8)
    if isinstance(left, tuple):
        m = left[0].to(m).T @ m
    elif left is not None:
        m = left.double().clamp(min=1e-8)[:, None] * m
    return m


def _times_inverse(m: torch.Tensor, side: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """M·S⁻¹ for `whitening`'s (S, S⁻¹): with the inverse given, a product; for a triangular S, a solve."""
    root, inverse = side
    if inverse is not None:
        return m @ inverse.to(m)
    return torch.linalg.solve_triangular(root.to(m), m, upper=False, left=False)


def factor_ladder(
    residual: torch.Tensor,
    rank: int,
    whiten: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    channel_scale: torch.Tensor | None = None,
    output: Side = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B (out, r), A (r, in) and the energies σᵢ² of the weighted residual (as many as were computed).

    B[:, :k]·A[:k] is the best rank-k approximation for every k ≤ r at once (SVD truncations nest),
    which lets the rank allocation decide k after one decomposition per layer.
    """
    rank = min(rank, *residual.shape)
    right: Side = whiten if whiten is not None else channel_scale
    u, s, vh = _truncated_svd(_weigh(residual, output, right), rank)
    b, a = u[:, :rank] * s[:rank].sqrt(), s[:rank].sqrt()[:, None] * vh[:rank]
    if isinstance(right, tuple):
        a = _times_inverse(a, right)
    elif right is not None:
        a = a / right.double().clamp(min=1e-8)
    if isinstance(output, tuple):
        b = _times_inverse(b.T, output).T  # T⁻¹·B = (Bᵀ·S⁻¹)ᵀ with T = Sᵀ
    elif output is not None:
        b = b / output.double().clamp(min=1e-8)[:, None]
    return b.float(), a.float(), s.double() ** 2


def low_rank_factors(
    residual: torch.Tensor,
    rank: int,
    whiten: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    channel_scale: torch.Tensor | None = None,
    output: Side = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out, r), A (r, in) with B·A the best rank-r approximation of `residual` (out, in).

    With `whiten` = (S, S⁻¹) the error is measured through the inputs, ‖(R − BA)·S‖ = ‖X(R − BA)ᵀ‖;
    with `channel_scale` d (in,) through the per-channel RMS only, ‖(R − BA)·diag(d)‖; with neither,
    plainly (‖R − BA‖, a truncated SVD of R). `output` weighs the output side the same way:
    (T, T⁻¹) of the gradients' Gram matrix, or a per-channel scale (its diagonal's square root).
    """
    b, a, _ = factor_ladder(residual, rank, whiten, channel_scale, output)
    return b, a


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


GRADIENT_GRAM_BYTES = 2 << 30  # full output-side Gram matrices up to this much memory together, else their diagonals


class GradientGramCollector:
    """Accumulates E[g gᵀ] of the loss gradients g at the outputs of named linear layers (module docstring).

    The loss is the negative log-likelihood of answer tokens sampled from the model's own next-token
    distribution at each answer position (`samples` draws per sequence, seeded), so E[g gᵀ] is the
    Fisher information seen at that layer's output. Only activations get gradients; the weights stay frozen.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], samples: int = 2, seed: int = 0, max_bytes: int = GRADIENT_GRAM_BYTES):
        self.model, self.names, self.samples, self.seed = model, list(names), samples, seed
        modules = dict(model.named_modules())
        widths = {name: int(modules[name].out_features) for name in self.names}
        self.full = sum(w * w * 4 for w in widths.values()) <= max_bytes
        self.grams: dict[str, torch.Tensor] = {}
        self.draws = 0
        self._keep: torch.Tensor | None = None

    def _hook(self, name: str) -> Callable:
        def on_output(_module, _args, output):
            def on_gradient(grad):
                flat = grad.detach().reshape(-1, grad.shape[-1])
                if self._keep is not None:
                    flat = flat[self._keep]
                flat = flat.float()
                update = flat.T @ flat if self.full else (flat * flat).sum(0)
                self.grams[name] = self.grams.get(name, 0) + update

            if output.requires_grad:
                output.register_hook(on_gradient)

        return on_output

    def run(self, batches: list[SequenceBatch], on_batch: Callable[[int, int], None] | None = None) -> None:
        modules = dict(self.model.named_modules())
        hooks = [modules[name].register_forward_hook(self._hook(name)) for name in self.names]
        # the graph starts at the embeddings' output: gradients reach every activation, no weight gets one
        model: Any = self.model  # get_input_embeddings is a transformers method (torch types attributes Tensor | Module)
        hooks.append(model.get_input_embeddings().register_forward_hook(lambda _m, _a, output: output.requires_grad_()))
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        try:
            for number, batch in enumerate(batches, start=1):
                batch = batch.to(device)
                self._keep = batch.attention_mask.reshape(-1).bool()
                with torch.enable_grad():
                    logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
                    answer = batch.response_mask[:, 1:].bool()
                    predicted = logits[:, :-1][answer].float()  # (answer tokens, vocab)
                    probabilities = torch.softmax(predicted.detach(), dim=-1)
                    log_probabilities = torch.log_softmax(predicted, dim=-1)
                    for draw in range(self.samples):
                        tokens = torch.multinomial(probabilities, 1, generator=generator)
                        loss = -log_probabilities.gather(-1, tokens).sum()
                        loss.backward(retain_graph=draw + 1 < self.samples)
                self.draws += self.samples * int(batch.input_ids.shape[0])
                if on_batch is not None:
                    on_batch(number, len(batches))
        finally:
            for hook in hooks:
                hook.remove()
            self._keep = None

    def side(self, name: str, damping: float) -> Side:
        """The output-side weight of layer `name`: `whitening`'s (S, S⁻¹) of G + λI (T = Sᵀ), or √diag(G) when kept diagonal."""
        gram = self.grams[name] / max(self.draws, 1)
        if not self.full:
            return gram.clamp(min=0).sqrt()
        try:
            return whitening(gram, 1, damping)
        except RuntimeError:  # eigh did not converge
            return torch.diagonal(gram).clamp(min=0).sqrt()


def collect_grams(teacher: nn.Module, names: Iterable[str], batches: list[SequenceBatch]) -> GramCollector:
    """The Gram matrices of the FP model's inputs to the named layers over the calibration batches."""
    if not batches:
        raise ValueError("init 'calibrated' needs calibration batches")
    collector = GramCollector(teacher, names)
    with collector:
        collector.run(batches)
    return collector


class _Weighting:
    """How each layer's error is measured: (S, S⁻¹) of its inputs' Gram matrix, or the per-channel RMS
    where the full matrix is too large or eigh fails; one per group of layers sharing an input."""

    def __init__(self, collector: GramCollector | None, damping: float, max_full_gram_dim: int, gradients: GradientGramCollector | None = None):
        self.collector, self.damping, self.max_full_gram_dim = collector, damping, max_full_gram_dim
        self.gradients = gradients
        self.whitenings: dict[str, tuple[torch.Tensor, torch.Tensor | None] | None] = {}

    def output(self, name: str) -> Side:
        return None if self.gradients is None else self.gradients.side(name, self.damping)

    def __call__(self, name: str) -> tuple[tuple[torch.Tensor, torch.Tensor | None] | None, torch.Tensor | None]:
        if self.collector is None:
            return None, None
        gram, count = self.collector.gram(name)
        owner = self.collector.groups.get(name, name)
        whiten = None
        if gram.shape[0] <= self.max_full_gram_dim:
            if owner not in self.whitenings:
                try:
                    self.whitenings[owner] = whitening(gram, count, self.damping)
                except RuntimeError:  # eigh did not converge: fall back to the diagonal
                    self.whitenings[owner] = None
            whiten = self.whitenings[owner]
        if whiten is None:
            return None, (torch.diagonal(gram) / max(count, 1)).sqrt()
        return whiten, None


def allocate_ranks(energies: dict[str, torch.Tensor], costs: dict[str, int], budget: int, max_rank: int) -> dict[str, int]:
    """Per-layer ranks within `budget` parameters: greedily the next rank with the most error energy per parameter.

    `energies[name]` are the layer's error energies per rank, in decreasing order (σᵢ² of its weighted
    residual, relative to its output); `costs[name]` the parameters one rank costs (in + out).
    """
    import heapq

    ranks = dict.fromkeys(energies, 0)
    heap = [(-float(energy[0]) / costs[name], name) for name, energy in energies.items() if len(energy) and max_rank > 0]
    heapq.heapify(heap)
    spent = 0
    while heap:
        gain, name = heapq.heappop(heap)
        if spent + costs[name] > budget:
            continue  # a cheaper layer may still fit
        ranks[name] += 1
        spent += costs[name]
        k = ranks[name]
        if k < min(max_rank, len(energies[name])):
            heapq.heappush(heap, (-float(energies[name][k]) / costs[name], name))
    return ranks


@dataclass
class Ladder:
    """A layer's factors up to rank m: B[:, :k]·A[:k] is the best rank-k correction for every k ≤ m."""

    b: torch.Tensor  # (out, m)
    a: torch.Tensor  # (m, in)
    full_gram: bool  # the input side was whitened with the full Gram matrix (else its diagonal)


def plan_ranks(
    student: nn.Module,
    teacher: nn.Module,
    names: list[str],
    collector: GramCollector,
    rank: int,
    damping: float = 0.01,
    max_full_gram_dim: int = 8192,
    max_rank: int | None = None,
    gradients: GradientGramCollector | None = None,
) -> tuple[dict[str, int], dict[str, Ladder]]:
    """Ranks for `names` (layers of the quantized `student`, no adapter yet) with the parameter count
    of rank `rank` everywhere, spent where the calibrated error is largest (module docstring); and
    each layer's factors up to the largest rank it could get, for `initialise_adapter` to cut."""
    weighting = _Weighting(collector, damping, max_full_gram_dim, gradients)
    student_modules, teacher_modules = dict(student.named_modules()), dict(teacher.named_modules())
    max_rank = max_rank or 4 * rank
    energies, costs, ladders = {}, {}, {}
    for name in names:
        w = teacher_modules[name].weight.detach().double()
        residual = w - dequantized_weight(student_modules[name]).double().to(w.device)
        whiten, scale = weighting(name)
        output = weighting.output(name)
        b, a, energy = factor_ladder(residual, max_rank, whiten, scale, output)
        if output is None:  # no common unit: each layer's error relative to its own output
            energy = energy / (_weigh(w, None, whiten if whiten is not None else scale) ** 2).sum().clamp(min=1e-30)
        energies[name], ladders[name] = energy, Ladder(b, a, whiten is not None)
        costs[name] = int(w.shape[0] + w.shape[1])
    budget = rank * sum(costs.values())
    return allocate_ranks(energies, costs, budget, max_rank), ladders


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
    match_dora_magnitude(layer, adapter)


def match_dora_magnitude(layer: Any, adapter: str = "default") -> None:
    """DoRA layers: set the per-channel magnitudes to the row lengths of base + s·B·A, so the layer
    computes exactly base + s·B·A (DoRA's rescaling is then 1); no-op for plain LoRA layers."""
    magnitudes = getattr(layer, "lora_magnitude_vector", None)
    if not magnitudes or adapter not in magnitudes:
        return
    dora = magnitudes[adapter]
    with torch.no_grad():
        delta = layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float()
        norm = dora.get_weight_norm(dequantized_weight(layer).to(delta.device), delta, scaling=layer.scaling[adapter])
        dora.weight.copy_(norm.to(dora.weight.dtype))


def initialise_adapter(
    policy: nn.Module,
    teacher: nn.Module,
    init: str,
    batches: list[SequenceBatch] | None = None,
    damping: float = 0.01,
    max_full_gram_dim: int = 8192,
    adapter: str = "default",
    on_layer: Callable[[int, int], None] | None = None,
    collector: GramCollector | None = None,
    gradients: GradientGramCollector | None = None,
    ladders: dict[str, Ladder] | None = None,
) -> InitResult:
    """Set every LoRA layer of `policy` from its quantization error (see the module docstring).

    `teacher` is the FP model the quantized base came from (same module names); `batches` are the
    calibration sequences (needed by `calibrated`), or `collector` their Gram matrices already
    collected (the rank allocation needs them first); `gradients` the output-side Gram matrices
    (`calibrated` only; without them the output side is unweighted); `ladders` the factors
    `plan_ranks` already computed. Each layer gets its own rank (PEFT's rank_pattern).
    Returns what was done, with timings.
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
    if init == "calibrated" and collector is None:
        collector = collect_grams(teacher, layers, batches or [])
    if collector is not None:
        result.calibration_sequences = sum(int(b.input_ids.shape[0]) for b in batches or [])
        result.calibration_tokens = int(sum(int(b.attention_mask.sum()) for b in batches or []))
        result.peak_gram_bytes = sum(g.numel() * g.element_size() for g in collector.grams.values())
        result.timings["activations_seconds"] = round(time.monotonic() - started, 2)
    factor_started = time.monotonic()
    weighting = _Weighting(collector, damping, max_full_gram_dim, gradients if init == "calibrated" else None)
    if weighting.gradients is not None:
        result.peak_gram_bytes += sum(g.numel() * g.element_size() for g in weighting.gradients.grams.values())
        result.gradient_draws = weighting.gradients.draws
        result.output_weighting = "full" if weighting.gradients.full else "diagonal"
    errors = []
    for number, (name, layer) in enumerate(layers.items(), start=1):
        w = teacher_modules[name].weight.detach().float()
        q = dequantized_weight(layer).to(w.device)
        residual = w - q  # (out, in)
        layer_rank = layer.r[adapter]
        ladder = (ladders or {}).get(name)
        if ladder is not None:
            b, a, full = ladder.b[:, :layer_rank], ladder.a[:layer_rank], ladder.full_gram
        else:
            whiten, scale = weighting(name)
            b, a = low_rank_factors(residual, layer_rank, whiten=whiten, channel_scale=scale, output=weighting.output(name))
            full = whiten is not None
        if collector is not None:
            result.full_gram_layers += int(full)
            result.diagonal_layers += int(not full)
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
    """‖X(R − C)ᵀ‖ / ‖XRᵀ‖ computed from the Gram matrix: sqrt(tr(E H Eᵀ) / tr(R H Rᵀ)); a reported
    figure (4 decimals), so in float32."""
    g = gram.float()
    r = residual.float()
    e = r - correction.float()
    before = ((r @ g) * r).sum()
    after = ((e @ g) * e).sum()
    return float((after / before.clamp(min=1e-30)).clamp(min=0).sqrt())
