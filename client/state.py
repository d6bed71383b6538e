"""What a site keeps between messages and across restarts, on its own disk.

Each phase's local state (for pretraining: the MAE decoder, the method's running
statistics, the optimizer; for fine-tuning: the optimizer) is saved after every round as
``{phase}_r{round:04d}.pt``, atomically. A round loads the newest state of an *earlier*
round, so a round that is run again after an interruption starts from the same state as
the first time. The two newest files of each phase are kept.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from amlp_core.engine.artefacts import load_site_state, save_site_state

log = logging.getLogger(__name__)
KEEP = 2


class SiteState:
    """Round-tagged state files of one site in ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _files(self, phase: str) -> dict[int, Path]:
        pattern = re.compile(rf"{re.escape(phase)}_r(\d{{4}})\.pt$")
        if not self.root.is_dir():
            return {}
        found = {}
        for path in self.root.iterdir():
            match = pattern.match(path.name)
            if match:
                found[int(match.group(1))] = path
        return found

    def save(self, phase: str, round_: int, state: dict[str, Any]) -> Path:
        path = save_site_state(self.root / f"{phase}_r{round_:04d}.pt", phase, round_, state)
        files = self._files(phase)
        for old in sorted(files)[:-KEEP]:
            files[old].unlink(missing_ok=True)
        return path

    def load_before(self, phase: str, round_: int) -> dict[str, Any] | None:
        """The newest state saved by a round before ``round_``, or None."""
        earlier = [r for r in self._files(phase) if r < round_]
        if not earlier:
            return None
        return load_site_state(self._files(phase)[max(earlier)], phase)
