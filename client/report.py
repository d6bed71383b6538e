"""A site's own report, with its pictures: ``STATE/report/report.html`` and ``report.md``.

Drawn at the site from its own TensorBoard folder (``STATE/tensorboard``, :mod:`amlp_core.engine.board`):
its round curves (pretraining loss and masking ratio, fine-tuning loss, test Dice, epsilon) and the
pictures from its own cases (where the mask falls over the lesion, the prediction over the label), at
the first and the last round that drew them. It is written in the site's state folder and never sent.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from amlp_core import plots
from amlp_core.engine.board import BOARD_DIR
from amlp_core.plots import ReportError

log = logging.getLogger(__name__)
REPORT_DIR = "report"

#: The report's figures: title, then the scalar tags (``SECTION/KEY``) drawn in it; ``*`` any section.
FIGURES = (
    ("Pretraining loss per round", ("pretrain/loss", "pretrain/rec", "pretrain/ccl")),
    ("Masking ratio per pretraining round", ("pretrain/ratio",)),
    ("Fine-tuning loss per round", ("finetune/loss",)),
    ("Test Dice per round (this site's test cases)", ("evaluate/dice_mean", "evaluate/lesion_dice")),
    ("Epsilon spent", ("pretrain/epsilon", "finetune/epsilon")),
)


def _events(state_dir: Path):  # -> EventAccumulator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = state_dir / BOARD_DIR
    if not board.is_dir() or not list(board.glob("events.out.tfevents.*")):
        raise ReportError(f"{state_dir} is not a site's state folder: it has no {BOARD_DIR}/ event files")
    events = EventAccumulator(str(board), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def write_site_report(state_dir: str | Path) -> Path:
    """Write the site's report into ``STATE_DIR/report`` (it stays there).

    Returns:
        The HTML file.

    Raises:
        ReportError: ``state_dir`` holds no event files of a site.
    """
    state_dir = Path(state_dir)
    events = _events(state_dir)
    tags = events.Tags()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}
    figures: dict[str, bytes] = {}
    for title, wanted in FIGURES:
        curves = {tag: scalars[tag] for tag in wanted if scalars.get(tag)}
        if curves:
            figures[title] = plots.curves_png(curves, title)
    pictures = 0
    for tag in sorted(tags["images"]):
        shots = events.Images(tag)
        for shot in dict.fromkeys((shots[0], shots[-1])):  # the first and the last round that drew it
            figures[f"{tag}, round {shot.step} (label left)"] = shot.encoded_image_string
            pictures += 1
    rounds: dict[str, int] = defaultdict(int)
    for tag, points in scalars.items():
        rounds[tag.split("/")[0]] = max(rounds[tag.split("/")[0]], max(step for step, _ in points))
    last = {tag.split("/", 1)[1]: points[-1][1] for tag, points in scalars.items() if tag.startswith("evaluate/")}
    lines = [
        f"# Site report: {state_dir.resolve().name}",
        "",
        f"- state folder: {state_dir.resolve()}",
        *(f"- {section}: {n} rounds" for section, n in sorted(rounds.items())),
        f"- pictures: {pictures}, from this site's own cases (this report stays at the site)",
    ]
    if last:
        lines += ["", "## Last evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" for key, value in sorted(last.items())]
    out = plots.write_report(state_dir / REPORT_DIR, "fedamlp site report", "\n".join(lines), figures)
    log.info("wrote the site's report %s", out)
    return out
