"""The project's corpus of bad inputs: every kind of file, folder and value a careless user or a hostile
participant has handed (or could hand) the command line. ``tests/corpus/test_corpus.py`` runs every
command that takes an input of an entry's sort against that entry.

Build it by hand with ``python -m tests.corpus.build OUT`` to try the commands yourself; the test builds
it afresh in a temporary folder. Every file is small: the voxel bombs only *declare* a huge size.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

#: The spatial shape of the corpus volumes, and the settings of the tiny 3D model that reads them.
SHAPE = (16, 16, 16)
TINY_MODEL = (
    "model.img_size=16,16,16",
    "model.embed_dim=48",
    "model.depth=1",
    "model.num_heads=2",
    "model.decoder_dim=24",
    "model.decoder_depth=1",
    "model.decoder_heads=2",
    "train.batch_size=2",
    "train.finetune_steps=2",
    "train.epochs=1",
)

#: The sorts of input, and so the commands an entry is run against (tests/corpus/test_corpus.py).
SORTS = ("dataset", "setting", "config_file", "model", "scan", "output")


@dataclass(frozen=True)
class Entry:
    """One bad input: a path (or a ``KEY=VALUE`` setting) of one sort, and what its error must name."""

    kind: str
    sort: str  # one of SORTS
    value: str  # the path, or the KEY=VALUE setting
    culprit: str  # text the one-line error must contain: the file, the key or the value
    only: tuple[str, ...] = ()  # the commands it applies to, when not all of its sort's


# -- writers ------------------------------------------------------------------------------------
def _nii(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def _image(seed: int, shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 10, size=shape).astype(np.float32)
    image[4:12, 4:12, 4:12] += 50
    return image


def _label(seed: int, shape=SHAPE) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[5:11, 5:11, 5:8] = 1
    label[5:11, 5:11, 8:11] = 2
    return np.roll(label, seed % 3, axis=0)


def _bomb(path: Path, shape=(1000, 1000, 1000)) -> Path:
    """A NIfTI file of a few KB whose header declares ``shape`` float32 voxels."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 4096)
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_good_dataset(root: Path, n: int = 6) -> Path:
    """A valid MSD folder of ``n`` labelled 16^3 cases, classes {0, 1, 2}."""
    training = []
    for i in range(n):
        name = f"case_{i:03d}.nii.gz"
        _nii(root / "imagesTr" / name, _image(i))
        _nii(root / "labelsTr" / name, _label(i))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {"labels": {"0": "background", "1": "a", "2": "b"}, "tensorImageSize": "3D", "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _spoiled(root: Path, base: Path, name: str) -> Path:
    folder = root / "datasets" / name
    shutil.copytree(base, folder)
    return folder


def _edit_json(folder: Path, edit) -> Path:
    path = folder / "dataset.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    return path


# -- the corpus ---------------------------------------------------------------------------------
def _datasets(root: Path, base: Path) -> list[Entry]:
    """Dataset folders with one bad file or entry each; the culprit is that file (or dataset.json)."""
    entries = []

    def add(kind: str, spoil) -> None:
        folder = _spoiled(root, base, kind)
        culprit = spoil(folder)
        entries.append(Entry(kind, "dataset", str(folder), str(culprit)))

    img = "imagesTr/case_002.nii.gz"
    lab = "labelsTr/case_002.nii.gz"
    add("truncated_image", lambda f: _truncate(f / img))
    add("text_as_label", lambda f: (f / lab).write_text("not an image") and f / lab)
    add("label_value_outside_classes", lambda f: _nii(f / lab, _label(2) * 3))
    add("label_shape_mismatch", lambda f: _nii(f / lab, _label(2)[:, :, :10]))
    shifted = np.eye(4)
    shifted[:3, 3] = (4.0, 0.0, 0.0)
    add("label_geometry_mismatch", lambda f: _nii(f / lab, _label(2), shifted))
    add("label_not_integer", lambda f: _nii(f / lab, _label(2).astype(np.float32) * 0.5))
    add("label_four_components", lambda f: _nii(f / lab, np.stack([_label(2)] * 3, axis=-1)))

    def nan(f: Path) -> Path:
        image = _image(2)
        image[3, 3, 3] = np.nan
        return _nii(f / img, image)

    add("image_nan", nan)
    add("image_complex", lambda f: _nii(f / img, _image(2).astype(np.complex64) * (1 + 1j)))

    def uint64_max(f: Path) -> Path:
        path = f / lab
        nib.save(nib.Nifti1Image(np.full(SHAPE, 2**64 - 1, np.uint64), np.eye(4), dtype=np.uint64), str(path))
        return path

    add("label_uint64_max", uint64_max)
    add("label_negative", lambda f: _nii(f / lab, _label(2).astype(np.int16) - 1))

    def nan_pixdim(f: Path) -> Path:
        path = _nii(f / img, _image(2))
        header = nib.load(str(path)).header.copy()
        header.set_sform(None, code=0)  # the geometry from the qform and pixdim, as many writers leave it
        header["pixdim"][1] = np.nan
        nib.save(nib.Nifti1Image(_image(2), None, header), str(path))
        return path

    add("image_nan_pixdim", nan_pixdim)
    add("image_2d_in_3d_dataset", lambda f: _nii(f / img, _image(2)[:, :, 0]))
    add("image_two_channels", lambda f: _nii(f / img, np.stack([_image(2), _image(3)], axis=-1)))
    add("image_eight_channels", lambda f: _nii(f / img, np.stack([_image(2)] * 8, axis=-1)))
    add("image_voxel_bomb", lambda f: _bomb(f / img.replace(".gz", "")) and _point(f, 2, img.replace(".gz", "")))
    add("image_missing", lambda f: (f / img).unlink() or f / img)
    coarse = np.diag([64.0, 64.0, 64.0, 1.0])  # 16^3 voxels of 64 mm: 1024^3 voxels on the others' 1 mm grid
    entries.append(_resampling_bomb(root, base, coarse))
    add("label_missing", lambda f: (f / lab).unlink() or f / lab)
    add(
        "entry_duplicate",
        lambda f: (
            _edit_json(f, lambda m: m["training"].append(dict(m["training"][0]))).parent / "imagesTr/case_000.nii.gz"
        ),
    )
    add(
        "entry_outside_folder",
        lambda f: _edit_json(f, lambda m: m["training"].append({"image": "../good/imagesTr/case_000.nii.gz"})),
    )
    add("entry_absolute_path", lambda f: _edit_json(f, lambda m: m["training"].append({"image": "/etc/hostname"})))
    add("entry_without_image", lambda f: _edit_json(f, lambda m: m["training"].append({"label": lab})))
    add("entry_unsupported_type", lambda f: _txt_entry(f))
    add("dataset_json_not_json", lambda f: (f / "dataset.json").write_text("{training: [") and f / "dataset.json")
    add("dataset_json_a_fifo", lambda f: _fifo(f / "dataset.json"))
    add("labels_not_contiguous", lambda f: _edit_json(f, lambda m: m.update(labels={"0": "background", "2": "b"})))
    add(
        "labels_negative",
        lambda f: _edit_json(f, lambda m: m.update(labels={"-1": "ignore", "0": "background", "1": "a", "2": "b"})),
    )
    add(
        "dataset_json_deeply_nested",
        lambda f: (
            (f / "dataset.json").write_text('{"training": ' + "[" * 200_000 + "]" * 200_000 + "}")
            and f / "dataset.json"
        ),
    )
    add("dataset_json_binary", lambda f: (f / "dataset.json").write_bytes(bytes(range(256)) * 8) and f / "dataset.json")
    add("dataset_json_no_training", lambda f: _edit_json(f, lambda m: m.pop("training")))

    empty = root / "datasets" / "empty_folder"
    empty.mkdir(parents=True)
    entries.append(Entry("empty_folder", "dataset", str(empty), str(empty)))
    twice = root / "datasets" / "nifti_name_twice"
    _nii(twice / "images" / "a.nii.gz", _image(0))
    _nii(twice / "images" / "a.nii", _image(1))
    _nii(twice / "labels" / "a.nii.gz", _label(0))
    _nii(twice / "images" / "b.nii.gz", _image(2))
    _nii(twice / "labels" / "b.nii.gz", _label(2))
    # (the other commands refuse a NIfTI folder without class names before they look at its files)
    entries.append(
        Entry("nifti_name_twice", "dataset", str(twice), str(twice / "images" / "a.nii.gz"), ("data check",))
    )
    return entries


def _fifo(path: Path) -> Path:
    """A FIFO at ``path`` (in place of a file): opening it for reading waits for a writer forever."""
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def _resampling_bomb(root: Path, base: Path, affine: np.ndarray) -> Entry:
    """A small case whose header claims huge voxels: on the plan's grid (the other cases' 1 mm) it would need
    gigabytes. Refused when it is brought onto the plan, before anything is allocated (``data check`` does
    not plan)."""
    folder = _spoiled(root, base, "image_resampling_bomb")
    _nii(folder / "imagesTr/case_002.nii.gz", _image(2), affine)
    _nii(folder / "labelsTr/case_002.nii.gz", _label(2), affine)
    return Entry("image_resampling_bomb", "dataset", str(folder), "case_002", ("pretrain", "finetune", "evaluate"))


def _point(folder: Path, i: int, relative: str) -> Path:
    """Point training entry ``i`` of ``folder``'s dataset.json at ``relative``; returns that file."""
    _edit_json(folder, lambda m: m["training"][i].update(image=f"./{relative}"))
    return folder / relative


def _txt_entry(folder: Path) -> Path:
    (folder / "imagesTr" / "notes.txt").write_text("a scan, honestly")
    _point(folder, 2, "imagesTr/notes.txt")
    return folder / "imagesTr" / "notes.txt"


def _settings() -> list[Entry]:
    """Values no run can use; the culprit is the key (``federation.*``: simulate only)."""
    bad = [
        ("lr_infinite", "train.finetune_lr=inf"),
        ("lr_nan", "train.lr=nan"),
        ("heads_zero", "model.num_heads=0"),
        ("depth_zero", "model.depth=0"),
        ("size_zero", "model.img_size=0,16,16"),
        ("seed_negative", "train.seed=-1"),
        ("split_seed_negative", "data.split_seed=-3"),
        ("slice_axis_out_of_range", "data.slice_axis=5"),
        ("batch_size_float", "train.batch_size=1.5"),
        ("batch_size_text", "train.batch_size=many"),
        ("epochs_bool", "train.epochs=true"),
        ("unknown_key", "train.epochz=3"),
        ("unknown_policy", "data.on_bad_case=ignore"),
        ("voxel_limit_zero", "data.max_voxels=0"),
        ("label_fraction_above_one", "train.label_fraction=1.5"),
        ("device_typo", "train.device=cudaXYZ"),
        ("lr_huge", "train.lr=1e308"),
        ("finetune_lr_huge", "train.finetune_lr=1e12"),
        ("img_size_huge", "model.img_size=1024,1024,1024"),
        ("patch_size_one", "model.patch_size=1"),
        ("embed_dim_huge", "model.embed_dim=98304"),
        ("max_voxels_above_ceiling", "data.max_voxels=1e12"),
    ]
    entries = [Entry(kind, "setting", value, value.split("=")[0]) for kind, value in bad]
    simulation_only = ("simulate",)  # a single-site run has no federation to check
    entries.append(
        Entry("min_sites_above_sites", "setting", "federation.min_sites=5", "federation.min_sites", simulation_only)
    )
    entries.append(
        Entry(
            "init_encoder_missing",
            "setting",
            "federation.init_encoder=/nonexistent/encoder",
            "/nonexistent/encoder",
            simulation_only,
        )
    )
    return entries


def _config_files(root: Path) -> list[Entry]:
    folder = root / "configs"
    folder.mkdir(parents=True)
    files = {
        "config_not_yaml": ("train: {epochs: [1,\n", None),
        "config_a_list": ("- train\n- model\n", None),
        "config_unknown_section": ("trainer: {epochs: 3}\n", "trainer"),
        "config_bad_value": ("train: {epochs: -2}\n", "train.epochs"),
    }
    entries = []
    for kind, (text, culprit) in files.items():
        path = folder / f"{kind}.yaml"
        path.write_text(text)
        entries.append(Entry(kind, "config_file", str(path), culprit or str(path)))
    binary = folder / "config_binary.yaml"
    binary.write_bytes(b"train:\n  epochs: \xff\xfe\x00\x01\n")
    nested = folder / "config_deeply_nested.yaml"
    nested.write_text("train: " + "[" * 100_000 + "]" * 100_000 + "\n")
    entries += [
        Entry("config_a_fifo", "config_file", str(_fifo(folder / "fifo.yaml")), str(folder / "fifo.yaml")),
        Entry("config_dev_zero", "config_file", "/dev/zero", "/dev/zero"),
        Entry("config_a_folder", "config_file", str(folder), str(folder)),
        Entry("config_binary", "config_file", str(binary), str(binary)),
        Entry("config_deeply_nested", "config_file", str(nested), str(nested)),
    ]
    return entries


def _models(root: Path, good_model: Path) -> list[Entry]:
    """Model folders that are not a usable fine-tuned model; the culprit is the checkpoint (or folder)."""
    folder = root / "models"
    entries = []

    def add(kind: str, write) -> None:
        model = folder / kind
        model.mkdir(parents=True)
        culprit = write(model)
        entries.append(Entry(kind, "model", str(model), str(culprit)))

    add("model_empty_folder", lambda m: m)
    add("checkpoint_truncated", lambda m: _truncate(_copy(good_model / "checkpoint.pt", m)))
    add("checkpoint_text", lambda m: (m / "checkpoint.pt").write_text("weights") and m / "checkpoint.pt")
    add("checkpoint_pickle_payload", _pickle_payload)
    add("checkpoint_forged_no_config", lambda m: _forged(m, {"model": {}}, {"kind": "segmentation", "architecture": 2}))
    add(
        "checkpoint_forged_bad_config",
        lambda m: _forged(m, {}, {"kind": "segmentation", "architecture": 2, "config": {"model": {"depth": -1}}}),
    )
    add("checkpoint_a_fifo", lambda m: _fifo(m / "checkpoint.pt"))
    # Forged configs that would make the product allocate without end: a plan of 0.01 mm voxels (a 16^3 scan
    # becomes 1600^3; evaluate refuses its data as off the plan first), a network of 1024^3 input voxels.
    entries.append(
        _forged_config(
            folder,
            good_model,
            "checkpoint_plan_tiny_spacing",
            ("plan", "target_spacing"),
            [0.01] * 3,
            "data.max_voxels",
            ("predict",),
        )
    )
    entries.append(
        _forged_config(
            folder,
            good_model,
            "checkpoint_huge_network",
            ("model", "img_size"),
            [1024] * 3,
            "model.img_size",
            ("evaluate", "predict"),
        )
    )
    add("checkpoint_pretraining_kind", lambda m: _forged(m, {"method": {}}, {"kind": "pretrain", "architecture": 2}))
    return entries


def _forged_config(
    folder: Path, good_model: Path, kind: str, key: tuple[str, str], value, culprit: str, only: tuple[str, ...]
) -> Entry:
    """The good model with one value of its saved config changed (its weights and format intact)."""
    from amlp_core.engine.checkpoint import load_checkpoint, save_checkpoint

    model = folder / kind
    shutil.copytree(good_model, model)
    state, meta = load_checkpoint(model / "checkpoint.pt")
    meta["config"][key[0]][key[1]] = value
    save_checkpoint(model / "checkpoint.pt", state, meta)
    return Entry(kind, "model", str(model), culprit, only)


def _copy(path: Path, folder: Path) -> Path:
    return Path(shutil.copy(path, folder / path.name))


def _pickle_payload(model: Path) -> Path:
    """A checkpoint that would run a command when unpickled (torch.load with weights_only refuses it)."""

    class Payload:
        def __reduce__(self):
            return (print, ("the payload ran",))

    path = model / "checkpoint.pt"
    path.write_bytes(pickle.dumps({"state": Payload()}))
    return path


def _forged(model: Path, state: dict, meta: dict) -> Path:
    """A checkpoint in our file format whose contents lie (what a hostile party can write)."""
    from amlp_core.engine.checkpoint import save_checkpoint

    path = model / "checkpoint.pt"
    save_checkpoint(path, state, meta)
    return path


def _scans(root: Path) -> list[Entry]:
    """Files ``predict`` must refuse; the culprit is the file."""
    folder = root / "scans"
    entries = []

    def add(kind: str, path: Path) -> None:
        entries.append(Entry(kind, "scan", str(path), str(path)))

    add("scan_truncated", _truncate(_nii(folder / "truncated.nii.gz", _image(0))))
    add("scan_voxel_bomb", _bomb(folder / "bomb.nii"))
    add("scan_two_channels", _nii(folder / "two_channels.nii.gz", np.stack([_image(0), _image(1)], axis=-1)))
    add("scan_one_dimension", _nii(folder / "line.nii.gz", _image(0)[:, 0, 0]))
    nan = _image(0)
    nan[0, 0, 0] = np.inf
    add("scan_inf", _nii(folder / "inf.nii.gz", nan))
    text = folder / "scan.txt"
    text.write_text("not a scan")
    add("scan_unsupported_type", text)
    png = folder / "broken.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(png)
    add("scan_truncated_png", _truncate(png))
    add("scan_a_fifo", _fifo(folder / "pipe.nii.gz"))
    return entries


def _outputs(root: Path, good_scan: Path) -> list[Entry]:
    """Places a command must not write to (``predict --output``, ``--json``); the culprit is the path."""
    missing = root / "nowhere" / "deeper"
    return [
        Entry("output_is_the_input", "output", str(good_scan), str(good_scan), only=("predict",)),
        Entry("output_wrong_suffix", "output", str(root / "seg.png"), str(root / "seg.png"), only=("predict",)),
        Entry("output_in_missing_folder", "output", str(missing / "seg.nii.gz"), str(missing)),
        Entry(
            "json_in_missing_folder", "output", str(missing / "r.json"), str(missing), only=("evaluate", "data check")
        ),
        Entry("output_a_folder", "output", str(root), str(root), only=("predict",)),
    ]


def build_corpus(root: Path, good_model: Path | None = None) -> tuple[list[Entry], dict[str, Path]]:
    """Write the corpus into ``root``; returns its entries and the good inputs they are set beside
    (``dataset``, ``scan``; ``model`` when ``good_model``, a fine-tuned model of :data:`TINY_MODEL` on
    the good dataset, is given)."""
    root.mkdir(parents=True, exist_ok=True)
    base = write_good_dataset(root / "good")
    good = {"dataset": base, "scan": base / "imagesTr" / "case_000.nii.gz"}
    entries = _datasets(root, base) + _settings() + _config_files(root) + _scans(root)
    entries += _outputs(root, good["scan"])
    if good_model is not None:
        good["model"] = good_model
        entries += _models(root, good_model)
    names = [e.kind for e in entries]
    assert len(names) == len(set(names)), "corpus kinds must be unique"
    return entries, good


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    entries, _ = build_corpus(args.out)
    for entry in entries:
        print(f"{entry.sort:<12} {entry.kind:<30} {entry.value}")


if __name__ == "__main__":
    main()
