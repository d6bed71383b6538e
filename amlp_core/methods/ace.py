"""ACE: teacher-student consistency across two grid-aligned crops at a 2:1 side ratio (docs/methods.md).

Views. The *large* view is the training image itself (``[B, C, *S]``, the model's input size).
The *small* view is a crop of half its side, placed on the large view's patch grid (offset a
multiple of ``p`` along every axis, drawn per image with the seeded generator) and upsampled 2x
to the input size. The small view lies inside the large one, so the overlap is known exactly:
it is the whole small view, and in the large view the ``M = N / 2**dims`` tokens the crop covers.
Small-view token ``q`` (grid coordinates) lies inside large-view token ``offset / p + q // 2``:
a 2x2 (2x2x2) block of small-view tokens corresponds to one large-view token.

Losses (teacher = exponential moving average of the student's encoder and projection head;
teacher temperature ``ace_teacher_temp``, student ``ace_student_temp``):

- global: the overlap tokens pooled in each view, DINO cross-entropy with a centred teacher,
  both ways (teacher large -> student small and teacher small -> student large);
- composition: each block of student small-view tokens merged into one, matched to the
  teacher's large-view token of that block;
- decomposition: each student large-view overlap token expanded into a block, matched to the
  teacher's small-view tokens;
- total = ``ace_global_weight`` * global + (composition + decomposition) / 2.

The local matchings are :func:`~amlp_core.losses.ace.correspondence_matching` over the
correspondence matrix (queries against all the other view's overlap tokens of the image).

Teacher. Never trained by gradient (``requires_grad`` False); its momentum rises from
``ace_momentum`` to 1 by a cosine of the progress. The loops have no after-step hook, so the
EMA update DINO makes after the optimiser step is made at the start of the next step, with the
student as that step left it. The teacher stays at the site (only ``encoder.`` is shared).
Whenever the student encoder is loaded alone (the global encoder of a federated round, without
a ``teacher.`` entry) the teacher restarts from the student: each round's teacher begins at the
aggregated encoder, never at a site's stale average of its own earlier weights. Loading a full
state (the site's own saved state) keeps the saved teacher.

ACE masks nothing: its masking ratio is 0, which the federation's ratio guard compares like any other.
"""

from __future__ import annotations

import copy
import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from amlp_core.config import MethodConfig, ModelConfig
from amlp_core.errors import ConfigError
from amlp_core.losses.ace import correspondence_matching, dino_cross_entropy
from amlp_core.methods.base import PretrainMethod, StepOutput, register_method
from amlp_core.models.ace import Compose, Decompose, ProjectionHead

CENTER_MOMENTUM = 0.9  # DINO's


def teacher_momentum(progress: float, start: float = 0.996) -> float:
    """EMA momentum at training progress in [0, 1]: ``start`` at 0, 1 at 1, by a cosine."""
    t = min(max(float(progress), 0.0), 1.0)
    return 1.0 - (1.0 - start) * 0.5 * (1.0 + math.cos(math.pi * t))


def overlap_ids(offsets: torch.Tensor, grid_size: tuple[int, ...]) -> torch.Tensor:
    """Large-view token indices covered by the small crop, in the small view's block order.

    Args:
        offsets: ``[B, dims]`` the crop's corner in large-view patch units.
        grid_size: the patch grid ``G`` (even along every axis).

    Returns:
        ``[B, M]`` indices into the ``N`` large-view tokens, ``M = N / 2**dims``; entry ``j`` is the
        token covering block ``j`` of :func:`blocks`.
    """
    half = [g // 2 for g in grid_size]
    sub = torch.stack(
        torch.meshgrid(*[torch.arange(h, device=offsets.device) for h in half], indexing="ij"), dim=-1
    ).reshape(-1, len(grid_size))  # [M, dims], row-major
    coords = sub.unsqueeze(0) + offsets.unsqueeze(1)  # [B, M, dims]
    strides = [math.prod(grid_size[a + 1 :]) for a in range(len(grid_size))]
    return (coords * torch.tensor(strides, device=offsets.device)).sum(-1)  # [B, M]


def blocks(tokens: torch.Tensor, grid_size: tuple[int, ...]) -> torch.Tensor:
    """Group tokens by 2x2 (2x2x2) block: ``[B, N, D]`` -> ``[B, M, c, D]``, blocks row-major, ``c = 2**dims``."""
    b, _, d = tokens.shape
    dims = len(grid_size)
    x = tokens.reshape(b, *[s for g in grid_size for s in (g // 2, 2)], d)  # [B, g1/2, 2, g2/2, 2, ..., D]
    order = [0] + [1 + 2 * a for a in range(dims)] + [2 + 2 * a for a in range(dims)] + [1 + 2 * dims]
    return x.permute(*order).reshape(b, -1, 2**dims, d)


def unblocks(grouped: torch.Tensor, grid_size: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`blocks`: ``[B, M, c, D]`` -> ``[B, N, D]`` in patch order."""
    b, _, _, d = grouped.shape
    dims = len(grid_size)
    x = grouped.reshape(b, *[g // 2 for g in grid_size], *([2] * dims), d)  # [B, g1/2, ..., 2, ..., D]
    order = [0] + [i for a in range(dims) for i in (1 + a, 1 + dims + a)] + [1 + 2 * dims]
    return x.permute(*order).reshape(b, -1, d)


def two_scale_views(
    images: torch.Tensor, patch_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The small view of each image and where it lies.

    Args:
        images: ``[B, C, *S]`` the large views, ``S / patch_size`` even along every axis.

    Returns:
        ``(small [B, C, *S], offsets [B, dims])``: the half-side crop at ``offsets * patch_size``,
        upsampled 2x (bilinear / trilinear); offsets in large-view patch units.
    """
    b, _, *spatial = images.shape
    grid = [s // patch_size for s in spatial]
    offsets = torch.stack(
        [torch.randint(g // 2 + 1, (b,), generator=generator, device=images.device) for g in grid], dim=1
    )  # [B, dims]
    corners = (offsets * patch_size).tolist()
    crops = torch.stack(
        [
            images[cast(tuple[Any, ...], (i, slice(None), *[slice(c, c + s // 2) for c, s in zip(corner, spatial)]))]
            for i, corner in enumerate(corners)
        ]
    )  # [B, C, *S/2]
    mode = "trilinear" if len(spatial) == 3 else "bilinear"
    return F.interpolate(crops, scale_factor=2, mode=mode, align_corners=False), offsets


@register_method("ace")
class ACE(PretrainMethod):
    """ACE: teacher-student consistency of two grid-aligned views at a 2:1 side ratio, globally and by
    composition/decomposition of corresponding tokens (the module docstring); no pixel decoder.

    Reference: ACE, WACV 2025, official code jlianglab/ACE (branch ACEv3: the 2:1 crops); docs/methods.md, "ACE"."""

    uses_decoder = False

    def __init__(self, model_cfg: ModelConfig, method_cfg: MethodConfig, private: bool = False) -> None:
        super().__init__(model_cfg, method_cfg, private)
        if any(g % 2 for g in model_cfg.grid_size):
            raise ConfigError(
                f"invalid model.img_size={model_cfg.img_size}: method ace needs an even number of "
                f"patches (model.patch_size={model_cfg.patch_size}) along every axis, "
                f"got a grid of {model_cfg.grid_size}"
            )
        d, children = model_cfg.embed_dim, 2**model_cfg.spatial_dims
        self.head = ProjectionHead(d, method_cfg.ace_head_dim)
        self.compose = Compose(d, children)
        self.decompose = Decompose(d, children)
        self.teacher = nn.ModuleDict({"encoder": copy.deepcopy(self.encoder), "head": copy.deepcopy(self.head)})
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(method_cfg.ace_head_dim))
        self.center: torch.Tensor

    @classmethod
    def ratio_at(cls, method_cfg: MethodConfig, progress: float) -> float:
        """ACE masks nothing."""
        return 0.0

    def param_groups(self) -> list[dict]:
        """The student only (the teacher moves by EMA)."""
        return [{"params": [p for n, p in self.named_parameters() if not n.startswith("teacher.")], "lr_scale": 1.0}]

    # -- teacher -------------------------------------------------------------------------
    def _pairs(self):
        for name in ("encoder", "head"):
            yield from zip(self.teacher[name].parameters(), getattr(self, name).parameters())

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher = momentum * teacher + (1 - momentum) * student``, parameter by parameter."""
        for t, s in self._pairs():
            t.lerp_(s.detach(), 1.0 - momentum)

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """Teacher := student (encoder and projection head)."""
        for t, s in self._pairs():
            t.copy_(s)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As :meth:`nn.Module.load_state_dict`; a student encoder loaded without a teacher resets the teacher."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        keys = list(state_dict)
        if any(k.startswith("encoder.") for k in keys) and not any(k.startswith("teacher.") for k in keys):
            self.reset_teacher()
        return result

    # -- step ----------------------------------------------------------------------------
    def training_step(
        self, images: torch.Tensor, progress: float, generator: torch.Generator | None = None
    ) -> StepOutput:
        m = self.method_cfg
        grid = self.model_cfg.grid_size
        momentum = teacher_momentum(progress, m.ace_momentum)
        self.update_teacher(momentum)  # the EMA step of the previous optimiser step
        small, offsets = two_scale_views(images, self.model_cfg.patch_size, generator)  # [B, C, *S], [B, dims]
        ids = overlap_ids(offsets, grid)  # [B, M]

        # Student: each view on its own (batch-first per case, as DP-SGD's per-case gradients need).
        s_large = self._gather(self.encoder(images).tokens, ids)  # [B, M, D] the overlap tokens
        s_small = self.encoder(small).tokens  # [B, N, D]
        with torch.no_grad():
            t_large, t_small = self.teacher["encoder"](torch.cat([images, small])).tokens.chunk(2)  # [B, N, D] each
            t_large = self._gather(t_large, ids)  # [B, M, D]

        # Global: pooled overlap, both ways (each head call batch-first, for per-case gradients).
        with torch.no_grad():
            t_logits = torch.cat([self.teacher["head"](t_large.mean(1)), self.teacher["head"](t_small.mean(1))])
        s_logits = torch.cat([self.head(s_small.mean(1)), self.head(s_large.mean(1))])  # [2B, K], views crossed
        glob = dino_cross_entropy(s_logits, t_logits, self.center, m.ace_student_temp, m.ace_teacher_temp)
        if not self.private:  # a statistic of the cases: frozen under DP-SGD
            self._update_center(t_logits)

        # Local: composition (small blocks -> large token) and decomposition (large token -> small block).
        temps = (m.ace_student_temp, m.ace_teacher_temp)
        with torch.no_grad():
            teacher_head = cast(ProjectionHead, self.teacher["head"])
            k_large = teacher_head.project(t_large)  # [B, M, E]
            k_small = teacher_head.project(t_small)  # [B, N, E]
        q_comp = self.head.project(self.compose(blocks(s_small, grid)))  # [B, M, E]
        q_decomp = self.head.project(unblocks(self.decompose(s_large), grid))  # [B, N, E]
        eye_m = torch.eye(q_comp.shape[1], device=images.device)  # block j <-> overlap token j
        eye_n = torch.eye(q_decomp.shape[1], device=images.device)  # child i <-> small token i
        comp = correspondence_matching(q_comp, k_large, eye_m, *temps)
        decomp = correspondence_matching(q_decomp, k_small, eye_n, *temps)

        loss = m.ace_global_weight * glob + (comp + decomp) / 2
        metrics = {
            "loss": loss.item(),
            "global": glob.item(),
            "comp": comp.item(),
            "decomp": decomp.item(),
            "momentum": momentum,
            "ratio": 0.0,
        }
        return StepOutput(loss, metrics, None)

    @staticmethod
    def _gather(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]``, ``[B, M]`` -> ``[B, M, D]``."""
        return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))

    @torch.no_grad()
    def _update_center(self, teacher_logits: torch.Tensor) -> None:
        self.center.mul_(CENTER_MOMENTUM).add_(teacher_logits.float().mean(0), alpha=1 - CENTER_MOMENTUM)
