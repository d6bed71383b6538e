"""The configuration schema: one frozen dataclass per section, with the one set of defaults and the
checks of each value (and of values that depend on each other)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from amlp_core.errors import ConfigError
from amlp_core.faults import parse_faults

METHOD_NAMES = ("mae", "mps_ams", "amlp", "ahm", "ace")


#: Segmentation networks: the ViT encoder + light conv decoder, or a plain conv U-Net (no encoder).
SEG_ARCHS = ("vit", "unet")


#: Pretraining decoders: MAE's light transformer on the tokens, or SparK's multi-scale U-Net decoder.
PRETRAIN_DECODERS = ("transformer", "unet")


#: ``data.format`` values (amlp_core/data/cases.py reads each layout; auto picks one).
DATA_FORMATS = ("auto", "msd", "nifti", "png", "dicom")
#: ``data.on_bad_case`` values: refuse the dataset at its first bad case, or log the case and leave it out.
BAD_CASE_POLICIES = ("refuse", "skip")


UNET_FACTOR = 8  # the plain U-Net halves the resolution three times


#: The layout of the networks' weights. Checkpoints carry it and a run's digest covers it, so a
#: checkpoint of another layout (before 2: a ViT on raw patches beside a conv U-Net) is refused.
ARCHITECTURE = 2


#: Ceilings of the network a config may describe (far above any model this product trains: 256^3 voxels,
#: 8^3 patches of 32^3 voxels...), so that a forged config or checkpoint is refused before it is built.
MAX_WINDOW_VOXELS = 2**24  # the input window (256 x 256 x 256)
MAX_PATCHES = 2**16  # tokens of the ViT
MAX_WIDTH = 4096  # embedding, decoder and conv widths
MAX_COUNT = 256  # depths, channels in, classes
#: data.max_voxels may not be raised above this (8 GiB of float32 per array): the memory one case may take.
MAX_VOXELS_CEILING = 2**31


def opt(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] = (),
    note: str = "",
) -> Any:
    """A config field: its default and what it may hold, a range (``ge``/``gt`` below, ``le``/``lt`` above) or
    a closed set (``choices``), checked by :func:`check_fields`; ``note`` adds what a special value means."""
    rule = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata={**rule, "choices": choices, "note": note})


def _num(v: float) -> str:
    return f"{v:,}" if isinstance(v, int) and abs(v) >= 10_000 else f"{v:g}"


def rule_text(meta: Mapping[str, Any]) -> str:
    """What a field of :func:`opt` must hold, in words: ``must be in [0, 1)``, ``must be one of a, b``..."""
    if meta.get("choices"):
        names = [str(c) if c != "" else '""' for c in meta["choices"]]
        text = f"must be one of {', '.join(names)}"
    else:
        low = ("[", meta["ge"]) if "ge" in meta else ("(", meta["gt"]) if "gt" in meta else None
        high = ("]", meta["le"]) if "le" in meta else (")", meta["lt"]) if "lt" in meta else None
        if low and high:
            text = f"must be in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
        elif low:
            text = {("[", 0): "must not be negative", ("(", 0): "must be positive"}.get(
                low, f"must be {'at least' if low[0] == '[' else 'above'} {_num(low[1])}"
            )
        else:
            assert high is not None
            text = f"must be {'at most' if high[0] == ']' else 'below'} {_num(high[1])}"
    return f"{text} ({meta['note']})" if meta.get("note") else text


def _holds(meta: Mapping[str, Any], value: Any) -> bool:
    if meta.get("choices"):
        return value in meta["choices"]
    ops = {"ge": float.__ge__, "gt": float.__gt__, "le": float.__le__, "lt": float.__lt__}
    return all(ops[k](float(value), float(meta[k])) for k in ops if k in meta)


def check_fields(section: Any, name: str) -> None:
    """Checks every field of a config ``section`` (named ``name``) against its :func:`opt` rule.

    Raises:
        ConfigError: ``invalid NAME.FIELD=VALUE: must ...``, for the first field off its rule.
    """
    for f in dataclasses.fields(section):
        if "note" in f.metadata:
            value = getattr(section, f.name)
            _check(_holds(f.metadata, value), f"{name}.{f.name}", value, rule_text(f.metadata))


@dataclass(frozen=True)
class ModelConfig:
    """The encoder (conv stages, then a ViT on the patch grid), the MAE decoder and the segmentation network.

    ``conv_channels`` are the widths of the encoder's conv stages at 1/2, 1/4, ... resolution; the
    segmentation decoder mirrors them. ``seg_arch`` picks the segmentation network: ``vit`` (the
    pretrained encoder and a light conv U-Net decoder, :class:`~amlp_core.models.SegmentationNet`) or
    ``unet`` (a plain conv U-Net, channels 16-128, trained from scratch only: it has no encoder to
    pretrain or load).
    """

    spatial_dims: int = opt(3, choices=(2, 3))
    in_channels: int = opt(1, ge=1, le=MAX_COUNT)
    img_size: tuple[int, ...] = (48, 64, 48)
    patch_size: int = opt(8, gt=0)
    embed_dim: int = opt(192, ge=1, le=MAX_WIDTH)  # divisible by 6 (3D sin-cos position embedding) and num_heads
    depth: int = opt(4, ge=1, le=MAX_COUNT)
    num_heads: int = opt(6, ge=1)
    mlp_ratio: float = opt(4.0, gt=0, le=16)
    decoder_dim: int = opt(96, ge=1, le=MAX_WIDTH)
    decoder_depth: int = opt(2, ge=1, le=MAX_COUNT)
    decoder_heads: int = opt(4, ge=1)
    conv_channels: tuple[int, ...] = (16, 32, 64)  # encoder conv stages (the skips) at 1/2, 1/4, 1/8 resolution
    num_classes: int = opt(3, ge=2, le=MAX_COUNT, note="with background")
    # The segmentation network: vit (encoder + conv decoder) | unet (plain conv U-Net, from scratch).
    seg_arch: str = opt("vit", choices=SEG_ARCHS)
    # The pretraining decoder: transformer (MAE, tokens only) | unet (SparK, every scale).
    pretrain_decoder: str = opt("transformer", choices=PRETRAIN_DECODERS)
    # Post-processing of the predicted label map (amlp_core/engine/lesions.py), saved with the model: keep
    # only the largest connected component of each class, and remove components below this share of the image.
    post_keep_largest: bool = False
    post_min_share: float = opt(0.0, ge=0, lt=1)
    post_min_confidence: float = opt(0.0, ge=0, lt=1)  # components whose mean probability of their class is below
    tta_flips: bool = False  # test-time augmentation: average the predictions of every mirrored image

    def __post_init__(self) -> None:
        check_fields(self, "model")
        _check(
            len(self.img_size) == self.spatial_dims,
            "model.img_size",
            self.img_size,
            f"must have {self.spatial_dims} sizes (model.spatial_dims)",
        )
        _check(all(s >= 1 for s in self.img_size), "model.img_size", self.img_size, "every size must be positive")
        # Bounds on what a config (or a checkpoint's config) may make the product build, checked before any
        # tensor exists: a forged img_size of 1024^3 would otherwise build gigabytes of network first.
        window = math.prod(self.img_size)
        _check(
            window <= MAX_WINDOW_VOXELS,
            "model.img_size",
            self.img_size,
            f"the network's input window of {window:,} voxels is above the {MAX_WINDOW_VOXELS:,} any device holds",
        )
        _check(
            window // self.patch_size**self.spatial_dims <= MAX_PATCHES,
            "model.patch_size",
            self.patch_size,
            f"gives more than {MAX_PATCHES:,} patches in model.img_size={self.img_size}",
        )
        _check(
            len(self.conv_channels) >= 1 and all(1 <= c <= MAX_WIDTH for c in self.conv_channels),
            "model.conv_channels",
            self.conv_channels,
            f"needs at least one stage, every width in [1, {MAX_WIDTH}]",
        )
        for s in self.img_size:
            _check(
                s % self.patch_size == 0,
                "model.img_size",
                self.img_size,
                f"every size must be a multiple of model.patch_size={self.patch_size}",
            )
        _check(
            self.embed_dim % self.num_heads == 0,
            "model.embed_dim",
            self.embed_dim,
            f"must be divisible by model.num_heads={self.num_heads}",
        )
        _check(
            self.decoder_dim % self.decoder_heads == 0,
            "model.decoder_dim",
            self.decoder_dim,
            f"must be divisible by model.decoder_heads={self.decoder_heads}",
        )
        pos_div = 2 * self.spatial_dims
        for key, dim in (("model.embed_dim", self.embed_dim), ("model.decoder_dim", self.decoder_dim)):
            _check(
                dim % pos_div == 0,
                key,
                dim,
                f"must be divisible by {pos_div} for the {self.spatial_dims}D sin-cos position embedding",
            )
        _check(
            self.patch_size % 2 ** len(self.conv_channels) == 0,
            "model.conv_channels",
            self.conv_channels,
            f"too many stages for model.patch_size={self.patch_size} (each halves the resolution; "
            f"the patch side must be a multiple of 2 ** stages)",
        )
        if self.seg_arch == "unet":
            _check(
                all(s % UNET_FACTOR == 0 for s in self.img_size),
                "model.img_size",
                self.img_size,
                f"every size must be a multiple of {UNET_FACTOR} with model.seg_arch=unet (three stride-2 levels)",
            )

    @property
    def grid_size(self) -> tuple[int, ...]:
        """Number of patches along each spatial axis."""
        return tuple(s // self.patch_size for s in self.img_size)

    @property
    def num_patches(self) -> int:
        n = 1
        for g in self.grid_size:
            n *= g
        return n


@dataclass(frozen=True)
class MethodConfig:
    """The pretext method and its masking (docs/methods.md; defaults are the spec's)."""

    name: str = opt("amlp", choices=METHOD_NAMES)
    mask_ratio: float = opt(0.75, gt=0, lt=1)  # fixed ratio of mae
    amr_start: float = opt(0.25, gt=0, lt=1)
    amr_end: float = opt(0.75, gt=0, lt=1)
    amr_schedule: str = opt("linear", choices=("linear", "cosine"))
    mps_clusters: int = opt(2, ge=2)
    mps_random_fraction: float = opt(0.1, ge=0, le=1)
    # embed: the encoder's stem averaged per patch + intensity mean/std; tokens: its tokens on the whole, unmasked
    # image + intensity mean/std (context from every patch, at a second forward pass a step)
    mps_features: str = opt("embed", choices=("embed", "tokens"))
    mps_momentum: float = opt(0.9, ge=0, lt=1)  # running mean of the per-group loss
    mps_margin: float = opt(0.05, ge=0)  # relative loss lead a group needs over the smallest to be the lesion group
    mps_proj_dim: int = opt(16, ge=0, note="0: none")  # fixed random projection of the embedding before k-means
    mps_embed_weight: float = opt(1.0, ge=0)  # the stem's weight against the patches' intensity mean/spread
    kmeans_iters: int = opt(10, ge=1)
    kmeans_inits: int = opt(1, ge=1)  # restarts; each costs a full k-means (the step-time budget allows one)
    arl_tau: float = opt(1.0, gt=0)
    ccl_weight: float = opt(0.1, ge=0)
    ccl_temperature: float = opt(1.0, gt=0)
    ahm_entropy_weight: float = opt(0.01, ge=0)  # beta of the masking agent's entropy bonus
    ahm_agent_lr_scale: float = opt(10.0, gt=0)  # the agent learns at train.lr times this
    ace_momentum: float = opt(0.996, ge=0, le=1)  # teacher EMA momentum at the start; cosine to 1 over training
    ace_teacher_temp: float = opt(0.04, gt=0)
    ace_student_temp: float = opt(0.1, gt=0)
    ace_global_weight: float = opt(0.1, ge=0)  # total = this * global + (composition + decomposition) / 2
    ace_head_dim: int = opt(256, ge=2)  # prototypes of the DINO-style head of the global loss

    def __post_init__(self) -> None:
        check_fields(self, "method")
        _check(
            self.amr_start <= self.amr_end,
            "method.amr_start",
            self.amr_start,
            f"must not exceed method.amr_end={self.amr_end}",
        )


@dataclass(frozen=True)
class DataConfig:
    """Where the scans are and how they are cut."""

    path: str = "synthetic"  # a dataset folder, or "synthetic" for the built-in phantoms
    format: str = opt("auto", choices=DATA_FORMATS)
    as_slices: bool = False  # use 3D volumes as 2D slices (model.spatial_dims must be 2)
    slice_axis: int = opt(-1, ge=-3, le=2, note="a spatial axis")
    test_fraction: float = opt(0.2, ge=0, lt=1)
    split_seed: int = opt(0, ge=0)
    synthetic_cases: int = opt(48, ge=2)
    synthetic_size: tuple[int, ...] = (32, 32, 32)
    synthetic_site: int = opt(0, ge=0)
    # A case that cannot be read or checked: refuse the data | skip (log it, leave it out).
    on_bad_case: str = opt("refuse", choices=BAD_CASE_POLICIES)
    # 2**28: a file whose header declares more values is refused before decompressing.
    max_voxels: int = opt(268_435_456, ge=1, le=MAX_VOXELS_CEILING)
    # The site's imaging modality (MR, CT, ...); auto: from dataset.json or the DICOM headers, else unknown.
    modality: str = "auto"
    # 2D images whose 16x16 thumbnails correlate above this are near-duplicates, kept on one side of every
    # split (amlp_core/data/duplicates.py); 1: not looked for.
    near_duplicates: float = opt(0.95, ge=0.5, le=1)

    def __post_init__(self) -> None:
        check_fields(self, "data")
        _check(
            len(self.synthetic_size) in (2, 3) and all(s >= 8 for s in self.synthetic_size),
            "data.synthetic_size",
            self.synthetic_size,
            "must be 2 or 3 sizes of at least 8",
        )

    @property
    def synthetic(self) -> bool:
        return self.path == "synthetic"


#: ``plan.normalization`` values: per-case z-score (MR and unknown modalities), or CT's clip to the federation's
#: foreground percentiles then z-score with its foreground mean and std.
NORMALIZATIONS = ("zscore", "ct")
#: ``plan.interpolation`` values (images; labels are always resampled nearest-neighbour).
INTERPOLATIONS = ("linear", "bspline")
#: ``plan.image_fit`` values, how a 2D image meets the network: ``resize`` to the input size (and the
#: prediction back to the image's own pixels), or ``window``: kept at its own pixels, cropped for training
#: and segmented by sliding windows. 3D scans are always ``window`` (they are resampled to a spacing).
IMAGE_FITS = ("resize", "window")


@dataclass(frozen=True)
class PlanConfig:
    """One geometry and intensity scale for every case of a run (amlp_core/data/plan.py). An empty value
    is decided from the sites' fingerprints when the run starts; the decided plan is saved with the model."""

    target_spacing: tuple[float, ...] = ()  # mm per axis, RAS order; (): the median of the sites' spacings
    modality: str = ""  # the run's modality; "": that of most cases
    normalization: str = opt("", choices=("", *NORMALIZATIONS))  # zscore | ct; "": ct for CT, else zscore
    clip: tuple[float, ...] = ()  # ct: (low, high) intensities; (): the sites' foreground 0.5 and 99.5 percentiles
    mean: float = 0.0  # ct: the federation's foreground mean and std (decided with clip)
    std: float = opt(0.0, ge=0)
    interpolation: str = opt("linear", choices=INTERPOLATIONS)  # images: linear | bspline (cubic); labels: nearest
    # The network's input in voxels per axis (it becomes model.img_size); (): model.img_size when the sites'
    # median case fits in it, else the sites' median shape within model.img_size's voxel count.
    input_size: tuple[int, ...] = ()
    # A site whose median spacing differs from the target by more than this factor on an axis is refused.
    max_spacing_ratio: float = opt(3.0, gt=1)
    # 2D images: resize | window (IMAGE_FITS); "": decided resize for 2D plans (measured, docs/results.md);
    # a 3D plan keeps "" (its scans are resampled to the spacing and tiled by windows).
    image_fit: str = opt("", choices=("", *IMAGE_FITS))

    def __post_init__(self) -> None:
        check_fields(self, "plan")
        _check(
            all(s > 0 and math.isfinite(s) for s in self.target_spacing) and len(self.target_spacing) in (0, 2, 3),
            "plan.target_spacing",
            self.target_spacing,
            "must be empty or 2 or 3 positive sizes in mm",
        )
        _check(len(self.clip) in (0, 2) and (not self.clip or self.clip[0] < self.clip[1]), "plan.clip", self.clip,
               "must be empty or (low, high) with low < high")  # fmt: skip
        _check(
            all(isinstance(s, int) and s >= 1 for s in self.input_size) and len(self.input_size) in (0, 2, 3),
            "plan.input_size",
            self.input_size,
            "must be empty or 2 or 3 positive sizes in voxels",
        )
        _check(
            self.image_fit != "resize" or len(self.target_spacing) != 3,
            "plan.image_fit",
            self.image_fit,
            "resize is for 2D images; 3D scans are resampled to plan.target_spacing",
        )
        if self.normalization == "ct" and self.clip:
            _check(self.std > 0, "plan.std", self.std, "must be positive with plan.normalization=ct")

    @property
    def decided(self) -> bool:
        """Whether every value is set (the run's plan), so that it can be applied as it is."""
        ct_ready = self.normalization != "ct" or (len(self.clip) == 2 and self.std > 0)
        chosen = (self.target_spacing, self.modality, self.normalization, self.input_size)
        return all(chosen) and ct_ready

    @property
    def resizes(self) -> bool:
        """Whether cases are resized to the input size (2D ``resize``); "" (a plan saved before image_fit
        existed) keeps each image's own pixels."""
        return self.image_fit == "resize"


#: The highest learning rate a config may set (AdamW's useful rates are far below; ours are 1e-3 and 1.5e-4).
MAX_LR = 1.0

#: ``privacy.trainable`` values: what trains under site DP (amlp_core/engine/optim.py select_trainable).
PRIVATE_TRAINABLE = ("auto", "all", "decoder", "norms_biases", "norms_biases_output")

#: ``train.augment`` values: nnU-Net-style strong augmentation then flips (amlp_core/data/transforms.py
#: strong_augment), or the crop and flips only.
AUGMENTATIONS = ("strong", "flip")

#: ``train.semi_supervised`` values (amlp_core/engine/semi.py).
SEMI_METHODS = ("none", "mean_teacher", "fixmatch", "copy_paste")
#: ``train.semi_view`` values: what the mean teacher's student sees of an unlabelled image: its own gaussian
#: noise (the teacher sees other noise), or the fixmatch strong view (intensities, and CutMix) of the image
#: the teacher sees clean.
SEMI_VIEWS = ("noise", "strong")
#: ``train.semi_teacher_start`` values: at each federated round the teacher restarts from the global model,
#: or keeps the site's running average.
TEACHER_STARTS = ("global", "keep")
#: ``train.semi_site_weight`` values: a site's weight in fine-tuning's average (its ``num-examples``) is its
#: labelled cases, or its labelled cases and its unlabelled pool.
SITE_WEIGHTS = ("labelled", "all")


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation, shared by pretraining and fine-tuning."""

    epochs: int = opt(10, ge=1)
    batch_size: int = opt(8, ge=1)
    # (a rate of 1e308 is a number, and diverges at the first step: after --overwrite removed the old run)
    lr: float = opt(1.5e-4, gt=0, le=MAX_LR)  # pretraining
    finetune_lr: float = opt(1e-3, gt=0, le=MAX_LR)
    # Fine-tuning a pretrained encoder (measured, docs/results.md: 0.1 and no ramp lost 3 Dice points):
    encoder_lr_scale: float = opt(1.0, ge=0)  # it learns at finetune_lr * this (an encoder from scratch: always 1)
    encoder_warmup: float = opt(0.1, ge=0, le=1)  # its rate ramps from 0 over this share of the steps
    # With model.pretrain_decoder=unet: the segmentation decoder starts from the pretraining decoder too
    # (all but its full-resolution level, which predicts classes, not pixels).
    init_decoder: bool = False
    weight_decay: float = opt(0.05, ge=0)
    warmup_epochs: int = opt(1, ge=0)
    label_fraction: float = opt(1.0, gt=0, le=1)
    seed: int = opt(0, ge=0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast where the device supports it (CUDA)
    num_threads: int = opt(0, ge=0, note="0: torch's default")  # torch CPU threads
    max_minutes: float = opt(0.0, ge=0)  # stop a command's training after this wall time; 0 = no limit
    # Fine-tuning budget in optimiser steps; 0 = epochs x the steps of one epoch over ALL the labelled
    # training cases (before label_fraction), so a small label fraction does not shrink the budget.
    finetune_steps: int = opt(0, ge=0, note="0: train.epochs over all the labelled cases")
    finetune_warmup: float = opt(0.05, ge=0, lt=1)  # share of the steps of linear warm-up, then cosine to 0
    # Single-site fine-tuning: test Dice every this many steps, into metrics.jsonl (0: at the end).
    eval_every: int = opt(0, ge=0)
    # Training augmentation: strong (nnU-Net-style, then flips) | flip (crop and flips only).
    augment: str = opt("strong", choices=AUGMENTATIONS)
    # A labelled image larger than model.img_size is cropped around a foreground voxel with this probability
    # (nnU-Net's 1/3), else anywhere; an image that fits the box is only padded.
    foreground_share: float = opt(0.33, ge=0, le=1)
    # Semi-supervised fine-tuning (amlp_core/engine/semi.py): the site's unlabelled pool (training cases whose
    # label is not used) enters the loss through a teacher, the EMA of the student.
    semi_supervised: str = opt("none", choices=SEMI_METHODS)
    semi_weight: float = opt(1.0, ge=0)  # the unlabelled loss's weight, once ramped up
    semi_rampup: float = opt(0.1, ge=0, le=1)  # share of the run over which that weight ramps up (sigmoid; 0: none)
    semi_ema: float = opt(0.99, ge=0, lt=1)  # the teacher's EMA momentum per step (0: the teacher is the student)
    semi_threshold: float = opt(0.95, gt=0, le=1)  # fixmatch: a pixel's pseudo-label counts from this probability
    semi_cutmix: float = opt(0.5, ge=0, le=1)  # strong views: probability that one takes another case's box
    semi_loss: str = opt("ce_dice", choices=("ce_dice", "ce"))  # fixmatch: the pseudo-labels' loss (ce: CE alone)
    semi_noise: float = opt(0.1, ge=0)  # mean_teacher: std of each view's gaussian noise (clipped at 2 std)
    semi_view: str = opt("noise", choices=SEMI_VIEWS)  # mean_teacher: the student's view (noise | strong)
    semi_paste: float = opt(0.667, gt=0, lt=1)  # copy_paste: the pasted box's share of each side (BCP: 2/3)
    semi_paste_weight: float = opt(0.5, ge=0)  # copy_paste: the pseudo-labelled pixels' weight (labelled ones: 1)
    semi_batch: int = opt(0, ge=0, note="0: train.batch_size")  # unlabelled cases per step
    # Federated: each round's teacher starts as the global model, or keeps the site's running average.
    semi_teacher_start: str = opt("global", choices=TEACHER_STARTS)
    # Federated: a site's weight in the average of the students (its num-examples) is its labelled cases, or with
    # `all` those and the unlabelled cases it learnt from (`labelled` measured 0.6 points better: docs/federation.md).
    semi_site_weight: str = opt("labelled", choices=SITE_WEIGHTS)

    def __post_init__(self) -> None:
        check_fields(self, "train")
        _check(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            "train.device",
            self.device,
            "must be auto, cpu, cuda or cuda:N",
        )

    @property
    def strong_views(self) -> bool:
        """Whether the semi-supervised student sees fixmatch's strong view (which ``semi_cutmix`` may mix with
        another case's): fixmatch, and the mean teacher with ``semi_view=strong``."""
        return self.semi_supervised == "fixmatch" or (
            self.semi_supervised == "mean_teacher" and self.semi_view == "strong"
        )


STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg")


#: Strategies that need each site's own update, which SecAgg+ hides from the server.
SECAGG_REFUSED = ("fedmedian", "fedtrimmedavg")


SECAGG_MODULUS = 2**32  # Flower's SecAggPlusWorkflow modulus_range (its default, kept)


PARTITIONS = ("iid", "dirichlet", "category")


@dataclass(frozen=True)
class FederationConfig:
    """The federated plan: rounds of each phase, aggregation, and how long to wait for sites."""

    sites: int = opt(3, ge=1)  # simulation: number of sites cut from one dataset
    pretrain_rounds: int = opt(2, ge=0)
    finetune_rounds: int = opt(2, ge=1)
    local_epochs: int = opt(1, ge=1)  # per round, in both phases
    # Fine-tuning optimiser steps per site per round; 0 = local_epochs x the steps of one epoch over all
    # the site's labelled training cases (before train.label_fraction).
    finetune_local_steps: int = opt(0, ge=0, note="0: federation.local_epochs over the site's labelled cases")
    # Federated evaluation of the global model after every this many fine-tuning rounds, and always after the last.
    eval_every: int = opt(1, ge=1)
    init_encoder: str = ""  # a pretraining checkpoint (folder or file) to fine-tune from; needs pretrain_rounds=0
    strategy: str = opt("fedavg", choices=STRATEGIES)
    proximal_mu: float = 0.01  # fedprox
    server_lr: float = 0.01  # fedadam
    trim_beta: float = opt(0.2, ge=0, lt=0.5)  # fedtrimmedavg: share cut at each end
    min_sites: int = opt(2, ge=1)  # a round with fewer successful replies fails the run
    round_timeout: float = opt(1800.0, gt=0)  # seconds to wait for the replies of one round
    connect_timeout: float = opt(300.0, gt=0)  # seconds to wait for min_sites sites to be connected
    # A site's update whose norm exceeds this many times the round's reference is rejected (0: off): the median of
    # 3+ replies, the smaller of 2, the previous round's for 1 (server/validation.py).
    update_norm_factor: float = 10.0
    # An accepted update longer than this many times the reference is scaled down to it before aggregation, so
    # that one site moves the average by a bounded step however few the sites (0: off; not under SecAgg+).
    update_clip_factor: float = 3.0
    # A site's weight in the average (its num-examples) is capped at this many times the median of what the other
    # sites declared, which it cannot inflate (0: off).
    max_weight_ratio: float = 4.0
    # ... and one whose cosine with the round's coordinate-wise median update is below this (3+ sites; -1: off;
    # honest sites late in training measured down to -0.39, sign-flipped updates -0.35 to -0.87).
    update_min_cosine: float = opt(-0.5, ge=-1, lt=1, note="-1 turns the direction check off")
    inject: str = ""  # simulation only: faults of simulated sites, e.g. "site1:crash@finetune:2" (amlp_core/faults.py)
    # Simulation only: each simulated site's train.label_fraction, comma-separated, one per site (site0 first), for
    # hospitals that labelled different shares of their cases ("": train.label_fraction at every site).
    site_label_fractions: str = ""
    # Simulation: iid | dirichlet (quantity skew) | category (class skew, by sub-folder).
    partition: str = opt("iid", choices=PARTITIONS)
    dirichlet_alpha: float = opt(0.5, gt=0)
    run_dir: str = "runs/federated"  # server: checkpoints and results
    resume: bool = False  # continue from run_dir's checkpoint
    overwrite: bool = False  # replace the run already in run_dir (refused otherwise)
    stop_after_rounds: int = opt(0, ge=0)  # stop (resumably) after this many rounds in this process; 0 = run to the end
    # SecAgg+ (Flower's legacy workflow) for the training rounds; docs/privacy.md "Secure aggregation".
    secure_aggregation: bool = False  # the server sees only the weighted sum of the sites' updates
    # The share of a round's sites each site's mask secrets are split among.
    secagg_num_shares: float = opt(1.0, gt=0, le=1)
    # The share of those shares needed to unmask: with half or fewer, a server that lies about dropouts could
    # unmask a site.
    secagg_reconstruction_threshold: float = opt(0.67, gt=0.5, le=1)
    secagg_clipping_range: float = opt(1.0, gt=0)  # bound on |update * weight / max_weight|; a site refuses beyond
    # 2**26 levels over [-clipping, clipping]; sites * this < 2**32.
    secagg_quantization_range: int = opt(67108864, ge=1, lt=SECAGG_MODULUS // 2)
    secagg_max_weight: float = opt(1000.0, gt=0)  # >= every site's weight (training examples); a site above refuses

    def label_fractions(self) -> tuple[float, ...]:
        """``site_label_fractions`` as numbers (empty: none given).

        Raises:
            ConfigError: an entry that is not a number in (0, 1].
        """
        out = []
        for item in _names(self.site_label_fractions):
            try:
                value = float(item)
            except ValueError:
                value = math.nan
            _check(
                0 < value <= 1,
                "federation.site_label_fractions",
                self.site_label_fractions,
                f"entry {item!r} is not a label fraction in (0, 1]",
            )
            out.append(value)
        return tuple(out)

    @property
    def encoder_pretrained(self) -> bool:
        """Whether fine-tuning starts from a pretrained encoder (this run's pretraining, or ``init_encoder``)."""
        return self.pretrain_rounds > 0 or bool(self.init_encoder)

    def __post_init__(self) -> None:
        check_fields(self, "federation")
        _check(
            not self.init_encoder or self.pretrain_rounds == 0,
            "federation.pretrain_rounds",
            self.pretrain_rounds,
            f"must be 0 with federation.init_encoder={self.init_encoder!r}: the run fine-tunes from that "
            "pretrained encoder, so it has no pretraining phase (set one or the other)",
        )
        parse_faults(self.inject)  # ConfigError naming a bad entry
        _check(
            self.update_clip_factor == 0 or self.update_clip_factor >= 1,
            "federation.update_clip_factor",
            self.update_clip_factor,
            "must be at least 1 (times the round's reference update norm), or 0 to turn clipping off",
        )
        _check(
            self.max_weight_ratio == 0 or self.max_weight_ratio >= 1,
            "federation.max_weight_ratio",
            self.max_weight_ratio,
            "must be at least 1 (times the other sites' median declaration), or 0 for no cap",
        )
        fractions = self.label_fractions()
        _check(
            not fractions or len(fractions) == self.sites,
            "federation.site_label_fractions",
            self.site_label_fractions,
            f"gives {len(fractions)} label fractions for {self.sites} sites (one per site, site0 first)",
        )
        for fault in parse_faults(self.inject):  # (simulated sites are site0 .. site{sites-1})
            number = fault.site.removeprefix("site")
            _check(
                fault.site.startswith("site") and number.isdigit() and int(number) < self.sites,
                "federation.inject",
                self.inject,
                f"names {fault.site!r}, none of the simulation's {self.sites} sites (site0 to site{self.sites - 1})",
            )
        _check(
            self.update_norm_factor == 0 or self.update_norm_factor > 1,
            "federation.update_norm_factor",
            self.update_norm_factor,
            "must be above 1 (times the round's median update norm), or 0 to turn the bound off",
        )
        if self.secure_aggregation:
            _check(
                self.strategy not in SECAGG_REFUSED,
                "federation.strategy",
                self.strategy,
                "cannot combine with federation.secure_aggregation=true: SecAgg+ shows the server only the "
                "weighted sum of the updates, and a robust strategy needs every site's own update "
                f"(use one of {', '.join(s for s in STRATEGIES if s not in SECAGG_REFUSED)})",
            )
            _check(
                self.min_sites >= 2,
                "federation.min_sites",
                self.min_sites,
                "must be at least 2 with federation.secure_aggregation=true (a sum of one update is that update)",
            )
        if self.secure_aggregation:  # (a deployment's number of sites is checked again in every round)
            _check(
                self.secagg_quantization_range * self.sites < SECAGG_MODULUS,
                "federation.secagg_quantization_range",
                self.secagg_quantization_range,
                f"times federation.sites={self.sites} must stay below 2**32, "
                "SecAgg+'s modulus (the sum of the quantized updates would overflow)",
            )


PRIVACY_PHASES = ("finetune", "both")


#: Strategies whose aggregation Flower's accounted server-side DP wrapper accepts (FedAvg's).
SERVER_DP_STRATEGIES = ("fedavg", "fedprox")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy: record-level DP-SGD at each site (Opacus), client-level DP at the server.

    Site DP (``site_dp``): every site clips each case's gradient to ``max_grad_norm`` and adds
    Gaussian noise; one RDP accountant per site covers the whole run, is kept in the site's
    state directory, and a round that would take the site's epsilon (at ``delta``) past
    ``budget`` is refused. ``noise_multiplier`` 0 calibrates the noise once, so that the run's
    planned rounds spend exactly ``budget``.

    Server DP (``server_dp``): Flower's fixed-clipping wrapper clips each site's update to
    ``server_clipping_norm`` and noises the sum (``server_noise_multiplier``), with Flower's RDP
    accountant at ``delta`` over the sites; ``server_budget`` > 0 stops the run before it is exceeded.
    """

    site_dp: bool = False
    server_dp: bool = False
    phases: str = opt("finetune", choices=PRIVACY_PHASES)  # which phases are private: finetune | both
    # phases=both: the share of the budget pretraining's noise spends by itself; fine-tuning's noise spends the
    # rest (0: one noise level for both phases, each spending in proportion to its steps).
    pretrain_share: float = opt(0.0, ge=0, lt=1)
    budget: float = opt(8.0, gt=0)  # site: epsilon the whole run may spend at each site
    delta: float = opt(1e-5, gt=0, lt=1)
    max_grad_norm: float = opt(1.0, gt=0)  # site: per-case gradient clipping
    noise_multiplier: float = opt(0.0, ge=0)  # site: 0 = calibrate to spend `budget` over the planned rounds
    server_noise_multiplier: float = opt(1.0, gt=0, note="the accountant needs noise")
    server_clipping_norm: float = opt(5.0, gt=0)  # L2 norm of one site's update
    server_budget: float = opt(0.0, ge=0)  # 0 = report epsilon without a cap
    # Site DP fine-tuning recipe: which parameters train (all | decoder | norms_biases | norms_biases_output, the
    # latter with the decoder's output layer, the one level a pretrained decoder leaves fresh: fewer parameters take
    # less of the noise) and the optimiser (adamw | sgd, momentum 0.9). auto: the measured best for the start
    # (amlp_core/engine/optim.py private_recipe): a decoder that starts pretrained trains its norms, biases and
    # output layer with SGD, an encoder alone the decoder with SGD, nothing pretrained everything with AdamW.
    # Set (not auto) without site DP, the recipe applies as it is, unclipped and without noise: the reference
    # that measures what the noise costs.
    trainable: str = opt("auto", choices=PRIVATE_TRAINABLE)
    # Augmentation multiplicity (De et al. 2022): each sampled case trains as this many augmentations, their
    # gradients averaged before clipping (the noise does not grow; the step costs this many times more).
    augmult: int = opt(1, ge=1, le=32)
    optimizer: str = opt("auto", choices=("auto", "adamw", "sgd"))
    # Private fine-tuning's peak learning rate (0: the measured rate of the recipe's SGD where there is one, else
    # train.finetune_lr). DP-SGD steps on averaged clipped gradients of norm at most max_grad_norm, so SGD wants a
    # rate far above AdamW's.
    lr: float = opt(0.0, ge=0, le=16.0, note="0: the recipe's measured rate, or train.finetune_lr")

    def __post_init__(self) -> None:
        check_fields(self, "privacy")
        _check(
            self.pretrain_share == 0 or self.phases == "both",
            "privacy.pretrain_share",
            self.pretrain_share,
            "splits the budget between the phases: it needs privacy.phases=both",
        )
        _check(
            self.pretrain_share == 0 or self.noise_multiplier == 0,
            "privacy.pretrain_share",
            self.pretrain_share,
            f"calibrates each phase's noise to its share: it cannot go with privacy.noise_multiplier="
            f"{self.noise_multiplier:g} (set it to 0)",
        )

    def private(self, phase: str) -> bool:
        """Whether training in ``phase`` ("pretrain" or "finetune") is private."""
        return phase == "finetune" or self.phases == "both"


@dataclass(frozen=True)
class SiteConfig:
    """One hospital's own settings (from its site YAML; in a simulation, derived per site)."""

    name: str = ""
    state_dir: str = ""  # where the site keeps what must outlive a message or a restart
    # The site's terms (its site file only; client/terms.py): a run that asks for less is refused, saying why.
    max_epsilon: float = 0.0  # > 0: site DP in every phase the site trains in, at a budget of at most this
    require_secure_aggregation: bool = False  # the server may see only the sum of the updates (SecAgg+)
    accept_methods: str = ""  # comma-separated pretraining methods the site takes part in ("": any)
    accept_phases: str = "pretrain,finetune"  # the phases it takes part in

    def __post_init__(self) -> None:
        _check(
            math.isfinite(self.max_epsilon) and self.max_epsilon >= 0,
            "site.max_epsilon",
            self.max_epsilon,
            "must be a finite number >= 0 (0: no requirement)",
        )
        methods = _names(self.accept_methods)
        _check(
            set(methods) <= set(METHOD_NAMES),
            "site.accept_methods",
            self.accept_methods,
            f"must name methods among {', '.join(METHOD_NAMES)}",
        )
        phases = _names(self.accept_phases)
        _check(
            bool(phases) and set(phases) <= {"pretrain", "finetune"},
            "site.accept_phases",
            self.accept_phases,
            "must name pretrain and/or finetune",
        )

    @property
    def methods(self) -> tuple[str, ...]:
        """The accepted pretraining methods (empty: any)."""
        return _names(self.accept_methods)

    @property
    def phases(self) -> tuple[str, ...]:
        return _names(self.accept_phases)


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


@dataclass(frozen=True)
class Config:
    """The whole configuration, one frozen section per concern; build it with :func:`build_config` or
    :func:`load_config` (validated), change it with :meth:`replace`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)

    def __post_init__(self) -> None:
        if self.data.as_slices:
            _check(self.model.spatial_dims == 2, "data.as_slices", True, "needs model.spatial_dims=2")
        if self.data.synthetic:
            _check(
                len(self.data.synthetic_size) == self.model.spatial_dims,
                "data.synthetic_size",
                self.data.synthetic_size,
                f"must have model.spatial_dims={self.model.spatial_dims} sizes",
            )
        if self.privacy.site_dp:
            _check(
                self.federation.strategy != "fedprox",
                "federation.strategy",
                "fedprox",
                "cannot combine with privacy.site_dp: the proximal term's gradient is not per case, so DP-SGD "
                "would drop it (use fedavg)",
            )
        if self.privacy.site_dp and self.train.semi_cutmix > 0 and self.train.strong_views:
            raise ConfigError(
                f"invalid train.semi_cutmix={self.train.semi_cutmix!r} with privacy.site_dp=True: a CutMix view "
                "mixes two patients' images in one sample, so clipping each case's gradient no longer bounds "
                "what one case adds (set train.semi_cutmix=0 under site DP)"
            )
        if self.privacy.site_dp and self.train.semi_supervised == "copy_paste":
            raise ConfigError(
                "invalid train.semi_supervised='copy_paste' with privacy.site_dp=True: every copy-paste sample "
                "mixes a labelled and an unlabelled patient, so clipping each case's gradient no longer bounds "
                "what one case adds (use mean_teacher, or fixmatch with train.semi_cutmix=0, under site DP)"
            )
        if self.privacy.server_dp and self.federation.secure_aggregation:
            raise ConfigError(
                "invalid privacy.server_dp=True with federation.secure_aggregation=True: server-side "
                "clipping clips each site's update at the server, and SecAgg+ shows the server only "
                "their sum (clip at the sites instead; see docs/privacy.md)"
            )
        if self.train.init_decoder:
            _check(
                self.model.pretrain_decoder == "unet",
                "train.init_decoder",
                True,
                "needs model.pretrain_decoder=unet (the transformer pretraining decoder has no U-Net to load)",
            )
        if self.model.seg_arch == "unet":  # a plain U-Net has no encoder to load (pretraining: check_federation)
            _check(
                not self.federation.init_encoder,
                "federation.init_encoder",
                self.federation.init_encoder,
                "must be empty with model.seg_arch=unet: a plain U-Net has no encoder to load "
                "(it trains from scratch; use model.seg_arch=vit to fine-tune a pretrained encoder)",
            )
        if self.privacy.server_dp:
            _check(
                self.federation.strategy in SERVER_DP_STRATEGIES,
                "federation.strategy",
                self.federation.strategy,
                f"cannot combine with privacy.server_dp: Flower's accounted DP wrapper needs FedAvg's "
                f"aggregation (use one of {', '.join(SERVER_DP_STRATEGIES)})",
            )

    def check_federation(self) -> Config:
        """Checks that only a federated run needs (a single-site run ignores the federation's plan).

        Raises:
            ConfigError: a plain U-Net (``model.seg_arch=unet``) with pretraining rounds.
        """
        if self.model.seg_arch == "unet":
            _check(
                self.federation.pretrain_rounds == 0,
                "federation.pretrain_rounds",
                self.federation.pretrain_rounds,
                "must be 0 with model.seg_arch=unet: a plain U-Net has no encoder to pretrain "
                "(set federation.pretrain_rounds=0, or use model.seg_arch=vit)",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (tuples as lists), the form written to YAML and checkpoints."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def input_step(self) -> int:
        """What every side of the network's input must be a multiple of: the patch side, and the plain
        U-Net's :data:`UNET_FACTOR`; method ace wants an even number of patches per axis."""
        m = self.model
        step = math.lcm(m.patch_size, UNET_FACTOR) if m.seg_arch == "unet" else m.patch_size
        return 2 * step if self.method.name == "ace" else step

    def replace(self, **sections: Mapping[str, Any]) -> Config:
        """A copy with some fields changed: ``cfg.replace(train={"epochs": 3})``."""
        from amlp_core.config.parsing import build_config  # parsing builds on the schema

        return build_config(sections, base=self)

    def run_digest(self) -> str:
        """Hash of everything that decides a run's result: not where it is kept, how long it waits
        for sites, where it runs, the site's own name and folder, nor the plan (decided from the data when
        the run starts, and kept by a resumed run). A resumed run keeps it."""
        d = self.to_dict()
        d["federation"] = {k: v for k, v in d["federation"].items() if k not in RESUMABLE_KEYS}
        d["train"] = {k: v for k, v in d["train"].items() if k not in ("device", "num_threads")}
        del d["site"]
        del d["plan"]  # decided from the data at the start; a resumed run keeps the one it decided
        d["architecture"] = ARCHITECTURE
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def digest(self, *sections: str) -> str:
        """A short hash of the given sections (all when none), to refuse mismatched checkpoints."""
        d = self.to_dict()
        chosen = {k: d[k] for k in (sections or d.keys())}
        chosen["architecture"] = ARCHITECTURE
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


#: Federation settings that may change between a stopped run and its resumption.
RESUMABLE_KEYS = ("resume", "overwrite", "stop_after_rounds", "round_timeout", "connect_timeout", "run_dir")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "method": MethodConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "federation": FederationConfig,
    "privacy": PrivacyConfig,
    "site": SiteConfig,
    "plan": PlanConfig,
}


#: Keys a site may set for itself in its site file; everything else comes from the run.
SITE_KEYS = (
    "data.path",
    "data.format",
    "data.as_slices",
    "data.slice_axis",
    "data.test_fraction",
    "data.split_seed",
    "data.on_bad_case",
    "data.max_voxels",
    "data.modality",
    "train.device",
    "train.batch_size",
    "train.label_fraction",
    "train.num_threads",
    "train.amp",
    "privacy.budget",
    "site.name",
    "site.state_dir",
    "site.max_epsilon",
    "site.require_secure_aggregation",
    "site.accept_methods",
    "site.accept_phases",
)
#: What a site file must set itself (never taken from the run's submitter).
SITE_REQUIRED = ("data.path", "site.state_dir")


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"invalid {key}={value!r}: {why}")
