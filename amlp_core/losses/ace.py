"""ACE's consistency losses (docs/methods.md): global DINO-style cross-entropy, local matching.

Teacher inputs are targets only (detached here); the student's carry the gradient.
"""

from __future__ import annotations

import torch


def dino_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> torch.Tensor:
    """``H(softmax((t - center) / T_t), softmax(s / T_s))``, averaged over the batch.

    Args:
        student_logits: ``[B, K]`` prototype logits of the student.
        teacher_logits: ``[B, K]`` the teacher's, for the same content.
        center: ``[K]`` running mean of the teacher's logits (centering against collapse).

    Returns:
        scalar.
    """
    target = torch.softmax((teacher_logits.detach().float() - center) / teacher_temp, dim=-1)  # [B, K]
    log_pred = torch.log_softmax(student_logits.float() / student_temp, dim=-1)  # [B, K]
    return -(target * log_pred).sum(-1).mean()


def correspondence_matching(
    queries: torch.Tensor,
    keys: torch.Tensor,
    correspondence: torch.Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> torch.Tensor:
    """Soft-target matching of student queries to teacher keys over a correspondence matrix.

    Each query predicts which key it corresponds to, ``p_q = softmax_k(<q, k> / T_s)``. Its
    target is the key it corresponds to, softened by the teacher's own view of which keys look
    alike: ``t_q = sum_j C_qj softmax_k(<k_j, k> / T_t)``. Two keys the teacher cannot tell
    apart (plain background) share the target's mass, so the student is not asked to separate
    what has no content to separate; distinct keys give a nearly one-hot target.

    Args:
        queries: ``[B, Q, E]`` unit-norm student projections.
        keys: ``[B, K, E]`` unit-norm teacher projections.
        correspondence: ``[Q, K]`` or ``[B, Q, K]``, rows summing to 1 (which key(s) each query covers).

    Returns:
        scalar: cross-entropy ``-sum_k t_qk log p_qk``, averaged over queries and batch.
    """
    keys = keys.detach().float()
    log_pred = torch.log_softmax(queries.float() @ keys.transpose(1, 2) / student_temp, dim=-1)  # [B, Q, K]
    alike = torch.softmax(keys @ keys.transpose(1, 2) / teacher_temp, dim=-1)  # [B, K, K]
    target = correspondence.to(alike.dtype) @ alike  # [B, Q, K]
    return -(target * log_pred).sum(-1).mean()
