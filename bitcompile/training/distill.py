"""Logit distillation from the float (teacher) model into its ternary (student) copy.

QAT from a pretrained checkpoint has a teacher for free: the checkpoint itself. Matching its
next-token distribution gives a dense signal (every vocabulary entry, every position) where
cross-entropy gives one target token, the recipe of BitDistill / BitCPM-style fine-tuning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over positions of ``T² · KL(softmax(teacher / T) ‖ softmax(student / T))``.

    Args:
        student_logits: ``(..., vocab)``, with gradients.
        teacher_logits: the same shape; detached here (the teacher is not trained).
        temperature: ``T > 0``; the ``T²`` factor keeps gradient sizes comparable across ``T``.
        mask: optional boolean ``(...)``: positions that count (e.g. not padding).

    Computed in fp32 whatever the logits' dtype (bf16 log-softmax over a 49k vocabulary loses
    the small probabilities KL is made of).

    Raises:
        ValueError: shapes differ, ``temperature`` is not positive, or the mask selects nothing.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"distillation_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    if not temperature > 0:
        raise ValueError(f"distillation_loss: temperature={temperature!r} must be positive")
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().float().reshape(-1, vocab) / temperature, dim=-1)
    per_position = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    if mask is not None:
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(f"distillation_loss: mask {tuple(mask.shape)} must be {tuple(student_logits.shape[:-1])}")
        selected = mask.reshape(-1)
        if not selected.any():
            raise ValueError("distillation_loss: the mask selects no position")
        per_position = per_position[selected]
    return per_position.mean() * temperature**2
