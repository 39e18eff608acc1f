"""DPO / KD / NLL losses against values computed by hand."""

import math

import pytest
import torch

from qdpo_core.losses import dpo_loss, kd_loss, nll_loss, top1_hinge


def _pair():
    # Δ = (−10 − −12) − (−20 − −19) = 2 − (−1) = 3
    return torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([-12.0]), torch.tensor([-19.0])


def test_sigmoid_loss_matches_hand_value():
    losses, chosen, rejected = dpo_loss(*_pair(), beta=0.1, kind="sigmoid")
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.3))), rel=1e-6)
    assert chosen.item() == pytest.approx(0.2)  # β (−10 − −12)
    assert rejected.item() == pytest.approx(-0.1)  # β (−20 − −19)


def test_hinge_loss_matches_hand_value_and_saturates():
    losses, _, _ = dpo_loss(*_pair(), beta=0.1, kind="hinge")
    assert losses.item() == pytest.approx(1 - 0.3)
    losses, _, _ = dpo_loss(*_pair(), beta=1.0, kind="hinge")
    assert losses.item() == 0.0  # βΔ = 3 > 1


def test_ipo_loss_matches_hand_value():
    losses, _, _ = dpo_loss(*_pair(), beta=0.25, kind="ipo")
    assert losses.item() == pytest.approx((3 - 1 / 0.5) ** 2)


def test_sigmoid_loss_at_reference_is_log2_and_gradient_prefers_chosen():
    chosen = torch.tensor([-5.0], requires_grad=True)
    rejected = torch.tensor([-6.0], requires_grad=True)
    losses, _, _ = dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), beta=0.1)
    assert losses.item() == pytest.approx(math.log(2))
    losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent raises chosen, lowers rejected


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="sigmoid, hinge or ipo"):
        dpo_loss(*_pair(), kind="softmax")


def test_kd_loss_is_masked_mean_of_kl():
    teacher = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))  # (1, 2, 2)
    student = torch.log(torch.tensor([[[0.9, 0.1], [0.9, 0.1]]]))
    kl_first = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kd_loss(student, teacher, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(kl_first, rel=1e-5)
    assert kd_loss(student, teacher, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(kl_first / 2, rel=1e-5)
    assert kd_loss(teacher, teacher, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(0.0, abs=1e-7)


def test_nll_is_per_token():
    assert nll_loss(torch.tensor([-6.0, -4.0]), torch.tensor([3.0, 2.0])).item() == pytest.approx(2.0)


def test_reverse_and_confidence_aware_kd_match_hand_values():
    p_teacher, p_student = [0.9, 0.1], [0.6, 0.4]
    teacher = torch.log(torch.tensor([[p_teacher]]))  # (1, 1, 2)
    student = torch.log(torch.tensor([[p_student]]))
    mask = torch.tensor([[1.0]])
    forward = sum(t * math.log(t / s) for t, s in zip(p_teacher, p_student))
    reverse = sum(s * math.log(s / t) for t, s in zip(p_teacher, p_student))
    assert kd_loss(student, teacher, mask, "forward").item() == pytest.approx(forward, rel=1e-5)
    assert kd_loss(student, teacher, mask, "reverse").item() == pytest.approx(reverse, rel=1e-5)
    # the teacher is 90% sure of its top token: reverse KL gets weight 0.9, forward KL 0.1
    assert kd_loss(student, teacher, mask, "cakld").item() == pytest.approx(0.9 * reverse + 0.1 * forward, rel=1e-5)
    with pytest.raises(ValueError, match="forward, reverse or cakld"):
        kd_loss(student, teacher, mask, "jsd")


def test_top1_hinge_pushes_only_where_the_student_ranks_the_teachers_token_too_low():
    # teacher: token 0 leads token 1 by 0.05 (a near-tie), token 2 far behind; and a confident row (margin 5, capped at 1)
    teacher = torch.tensor([[2.05, 2.0, -3.0], [6.0, 1.0, 0.0]])
    agrees = torch.tensor([[1.2, 1.0, 0.0], [3.0, 1.5, 0.0]])  # top-1 right by 0.2 and 1.5: nothing to push
    assert top1_hinge(agrees, teacher).item() == 0.0
    flipped = torch.tensor([[1.0, 1.1, 0.0], [3.0, 2.5, 0.0]], requires_grad=True)  # row 0 flipped by 0.1; row 1 right by 0.5 < 1
    loss = top1_hinge(flipped, teacher)
    assert loss.item() == pytest.approx(((0.05 + 0.1) + (1.0 - 0.5)) / 2, rel=1e-5)
    loss.backward()
    grad = flipped.grad
    assert grad[0, 0] < 0 and grad[0, 1] > 0 and grad[0, 2] == 0  # a descent step raises the teacher's token, lowers its rival
    assert grad[1, 0] < 0 and grad[1, 1] > 0 and grad[1, 2] == 0
