"""Pretraining methods, selectable by name."""

from amlp_core.methods import ace as _ace  # noqa: F401  (registers ace)
from amlp_core.methods import ahm as _ahm  # noqa: F401  (registers ahm)
from amlp_core.methods import amlp as _amlp  # noqa: F401  (registers mps_ams, amlp)
from amlp_core.methods import mae as _mae  # noqa: F401  (registers mae)
from amlp_core.methods.base import METHODS, PretrainMethod, StepOutput, build_method, mask_ratio_at, register_method

__all__ = ["METHODS", "PretrainMethod", "StepOutput", "build_method", "mask_ratio_at", "register_method"]
