"""Named presets: settings that follow from the data, and the Flower app's embedded default run.

The schema's dataclasses (:mod:`amlp_core.config`) hold the one set of defaults. A preset is a flat
``{"section.field": value}`` mapping laid on top of them for a kind of data or a kind of run; it never
restates a default. The app's run configuration in ``pyproject.toml`` must equal the schema's defaults
with :data:`EMBEDDED_RUN` on top, value for value (a test checks it), so ``flwr run .``,
``fedamlp simulate`` and ``fedamlp simulate --config FILE`` start from the same settings.
"""

from __future__ import annotations

from typing import Any

#: The built-in phantoms' image size (also the network's input): 3D volumes, or 2D images.
PHANTOM_SIZE = {3: (32, 32, 32), 2: (64, 64)}

#: Regions of interest for a dataset on disk, the network's input size, by how it is read:
#: ``volume``: 3D scans. It holds an MSD Task04 hippocampus crop (about 35 x 50 x 35 voxels, at most
#: 43 x 59 x 47) padded to a multiple of the 8-voxel patch; larger scans are cropped, smaller padded.
#: ``slices``: the 2D slices of 3D scans (the same crop's in-plane size). ``image``: a 2D dataset (images
#: are resized to it): 128 x 128 segmented BUSI better than 256 x 256 at the same steps, at a fifth of the
#: cost on a CPU (docs/results.md).
ROI = {"volume": (48, 64, 48), "slices": (48, 64), "image": (128, 128)}

#: Post-processing of a 2D lesion dataset's predictions (BUSI: lesions cover 0.3 % to over 50 % of an image):
#: drop components under 0.5 % of the image and those whose mean lesion probability is under 0.9; keep the
#: others (keeping only the largest dropped the lesion whenever a false blob outgrew it). Chosen by
#: ``simulations/benchmarks/postprocess.py`` on a development split, BUSI's labelled training images that 12
#: few-label models (4 starts x 3 seeds) never trained on: the highest mean image Dice (a normal image
#: scores 1 when predicted empty), then scored once on the test split: normal images predicted empty 25 % ->
#: 39 %, lesion Dice -1.1 points, image Dice +1.2 points, better on 10 of the 12 models (docs/results.md).
LESION_IMAGES = {"model.post_keep_largest": False, "model.post_min_share": 0.005, "model.post_min_confidence": 0.9}

#: 3D scans. Inference averages the predictions of every mirrored volume (nnU-Net mirrors at inference by
#: default; the network trains with flips along every axis): on the hippocampus (one site, 10 % labels, 48
#: test volumes) it lifted the final model's mean Dice from 0.801 to 0.819, at about 4x the inference time.
#: Training batches of 4 (nnU-Net plans 2 for 3D): twice the steps of batch 8 for the same cases seen, which
#: the few-label federated hippocampus needed to pass 0.80 (docs/results.md, the default federated run).
VOLUMES = {"model.tta_flips": True, "train.batch_size": 4}


def phantoms(dims: int = 3) -> dict[str, Any]:
    """The built-in phantoms at ``dims`` (2 or 3): a model of their size, two classes (background, lesion)."""
    size = PHANTOM_SIZE[dims]
    return {"model.spatial_dims": dims, "model.img_size": size, "data.synthetic_size": size, "model.num_classes": 2}


#: The Flower app's embedded default run (``[tool.flwr.app.config]``): the README's first command, a
#: federation of 3 simulated hospitals (the schema's default) on 40 phantoms, half of them labelled, 4 pretraining and 12
#: fine-tuning rounds of 5 local epochs, the global model evaluated after every fourth. Everything else is the
#: schema's default.
EMBEDDED_RUN: dict[str, Any] = {
    **phantoms(3),
    "data.synthetic_cases": 40,
    "train.label_fraction": 0.5,
    "federation.pretrain_rounds": 4,
    "federation.finetune_rounds": 12,
    "federation.local_epochs": 5,
    "federation.eval_every": 4,
    "federation.run_dir": "runs/simulation",
}
