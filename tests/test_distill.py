"""bitcompile.training.distillation_loss against the KL written out by hand."""

import pytest
import torch

from bitcompile.training import distillation_loss


def _kl_by_hand(student, teacher, temperature):
    p = torch.softmax(teacher.double() / temperature, -1)
    log_q = torch.log_softmax(student.double() / temperature, -1)
    return (p * (p.log() - log_q)).sum(-1).mean() * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_the_definition_and_trains_only_the_student(temperature):
    student = torch.randn(2, 5, 11, requires_grad=True)
    teacher = torch.randn(2, 5, 11, requires_grad=True)
    loss = distillation_loss(student, teacher, temperature)
    assert loss.item() == pytest.approx(_kl_by_hand(student, teacher, temperature).item(), rel=1e-5)
    loss.backward()
    assert student.grad is not None and teacher.grad is None
    assert distillation_loss(teacher, teacher, temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_bf16_logits_are_compared_in_fp32_and_mask_selects_positions():
    student, teacher = torch.randn(3, 7, 50), torch.randn(3, 7, 50)
    exact = distillation_loss(student, teacher)
    assert distillation_loss(student.bfloat16(), teacher.bfloat16()).dtype == torch.float32
    assert distillation_loss(student.bfloat16(), teacher.bfloat16()).item() == pytest.approx(exact.item(), rel=2e-2)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[1, 2:5] = True
    masked = distillation_loss(student, teacher, mask=mask)
    assert masked.item() == pytest.approx(_kl_by_hand(student[1, 2:5], teacher[1, 2:5], 1.0).item(), rel=1e-5)


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="must be positive"):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="selects no position"):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 3), mask=torch.zeros(2, dtype=torch.bool))
