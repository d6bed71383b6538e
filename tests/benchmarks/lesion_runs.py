"""A fine-tuned run on a small BUSI-like folder, the real input of the lesion benchmarks (post-processing,
presence probe): its unused labelled images are the development split."""

import json
from pathlib import Path
from typing import Any

from amlp_core.config import build_config
from amlp_core.engine.pipeline import finetune
from amlp_core.engine.split import data_defaults
from tests.conftest import tiny_model


def busi_settings(tmp_path: Path, n_per_class: int, test_fraction: float) -> dict[str, Any]:
    """Settings of a tiny 2D network fine-tuned for 3 steps on half the labelled images of a BUSI-like folder
    with ``n_per_class`` images of each category."""
    from tests.data.test_lesion_data import write_busi

    root = write_busi(tmp_path / "Dataset_BUSI_with_GT", n_per_class=n_per_class)
    m = tiny_model(2)
    model = {f"model.{k}": getattr(m, k) for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
    model |= {f"model.{k}": getattr(m, k) for k in ("decoder_dim", "decoder_depth", "decoder_heads", "conv_channels")}
    base = {**data_defaults(str(root)), **model, "data.test_fraction": test_fraction, "train.device": "cpu"}
    return base | {"train.label_fraction": 0.5, "train.finetune_steps": 3, "train.batch_size": 4}


def finetuned(settings: dict[str, Any], run: Path, **more: Any) -> Path:
    """``run``, fine-tuned with ``settings`` and ``more`` on top."""
    finetune(build_config({**settings, **more}), run)
    return run


def benchmark_on_a_run(main, tmp_path: Path, stem: str, n_per_class: int, test_fraction: float):
    """Run a lesion benchmark's ``main`` on one fine-tuned run; check it wrote its JSON (the payload it returns)
    and its Markdown. Returns ``(settings, payload)``."""
    settings = busi_settings(tmp_path, n_per_class=n_per_class, test_fraction=test_fraction)
    run = finetuned(settings, tmp_path / "fine")
    out = tmp_path / f"{stem}.json"
    payload = main([str(run), "--out", str(out)])
    assert json.loads(out.read_text()) == payload and out.with_suffix(".md").exists()
    return settings, payload
