"""Pure loss functions: DPO (sigmoid / hinge / IPO), token-level KD, NLL. Testable alone.

All log-prob arguments are per sequence, shape (B,): summed over response tokens for sigmoid and
hinge, averaged over response tokens for IPO (as its definition asks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    kind: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards → (losses (B,), chosen_rewards (B,), rejected_rewards (B,)).

    Δ = [log πθ(y_w|x) − log πref(y_w|x)] − [log πθ(y_l|x) − log πref(y_l|x)]
    sigmoid: −log σ(βΔ)      hinge: max(0, 1 − βΔ)      ipo: (Δ − 1/(2β))²
    """
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif kind == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif kind == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}; use sigmoid, hinge or ipo")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, objective: str = "forward") -> torch.Tensor:
    """Mean over masked positions of a token-level divergence between teacher and student.

    forward  KL(p_teacher ‖ p_student): mode-covering, the classic KD baseline
    reverse  KL(p_student ‖ p_teacher): mode-seeking
    cakld    γ·reverse + (1 − γ)·forward with γ the teacher's confidence (its top-1 probability) at
             that position: BitDistiller's confidence-aware KL, per token instead of one dataset mean

    student_logits, teacher_logits: (B, T, V); mask: (B, T), 1 on the positions that count.
    """
    teacher_logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    student_logp = torch.log_softmax(student_logits.float(), dim=-1)
    if objective == "forward":
        divergence = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)  # (B, T)
    elif objective in ("reverse", "cakld"):
        reverse = (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
        if objective == "reverse":
            divergence = reverse
        else:
            forward = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
            confidence = teacher_logp.max(-1).values.exp()  # (B, T), no gradient flows through the teacher
            divergence = confidence * reverse + (1 - confidence) * forward
    else:
        raise ValueError(f"unknown KD objective {objective!r}; use forward, reverse or cakld")
    return (divergence * mask).sum() / mask.sum().clamp(min=1)


def top1_hinge(student_logits: torch.Tensor, teacher_logits: torch.Tensor, cap: float = 1.0) -> torch.Tensor:
    """Mean over positions of max(0, m − (s[t] − max_{j≠t} s[j])): t the teacher's top-1 token, m the
    teacher's own margin over its second token (capped at `cap`), s the student's logits.

    The greedy flip rate counts positions where the student's top-1 differs from the teacher's; forward
    KL barely weighs a near-tie of the teacher (both tokens already get almost the same probability
    mass), so a student can be close in KL and still pick the other token. This term is zero where the
    student ranks the teacher's token first by at least the teacher's margin and pushes only where it
    does not. student_logits, teacher_logits: (N, V).
    """
    teacher = teacher_logits.float()
    top2 = teacher.topk(2, dim=-1)
    target = top2.indices[:, 0]
    margin = (top2.values[:, 0] - top2.values[:, 1]).clamp(max=cap)
    student = student_logits.float()
    own = student.gather(-1, target[:, None]).squeeze(-1)
    best = student.topk(2, dim=-1)  # the best token other than t: the student's first, or its second where the first is t
    others = torch.where(best.indices[:, 0] == target, best.values[:, 1], best.values[:, 0])
    return torch.relu(margin - (own - others)).mean()


def nll_loss(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean per-token negative log-likelihood of whole sequences. logps: summed (B,), lengths (B,)."""
    return -(logps.sum() / lengths.sum().clamp(min=1))
