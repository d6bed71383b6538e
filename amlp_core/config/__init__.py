"""One configuration schema for the whole product.

A :class:`Config` is built once at the edge (YAML file, command line, Flower run config)
with :func:`build_config` and then passed around frozen. Unknown keys, wrong types and
out-of-range values raise :class:`~amlp_core.errors.ConfigError` naming the key.

Flat keys use ``section.field`` (``method.name``, ``train.epochs``); a nested mapping
``{"method": {"name": ...}}`` is accepted too.
"""

from amlp_core.config.files import apply_site_file, load_config, read_site_file, save_config
from amlp_core.config.parsing import build_config, build_section, check_keys, flat_dict
from amlp_core.config.schema import (
    ARCHITECTURE,
    BAD_CASE_POLICIES,
    DATA_FORMATS,
    METHOD_NAMES,
    PARTITIONS,
    PRETRAIN_DECODERS,
    PRIVACY_PHASES,
    RESUMABLE_KEYS,
    SECAGG_MODULUS,
    SECAGG_REFUSED,
    SECTIONS,
    SEG_ARCHS,
    SERVER_DP_STRATEGIES,
    SITE_KEYS,
    STRATEGIES,
    UNET_FACTOR,
    Config,
    DataConfig,
    FederationConfig,
    MethodConfig,
    ModelConfig,
    PlanConfig,
    PrivacyConfig,
    SiteConfig,
    TrainConfig,
)

__all__ = [
    "ARCHITECTURE",
    "BAD_CASE_POLICIES",
    "DATA_FORMATS",
    "METHOD_NAMES",
    "PARTITIONS",
    "PRETRAIN_DECODERS",
    "PRIVACY_PHASES",
    "RESUMABLE_KEYS",
    "SECAGG_MODULUS",
    "SECAGG_REFUSED",
    "SECTIONS",
    "SEG_ARCHS",
    "SERVER_DP_STRATEGIES",
    "SITE_KEYS",
    "STRATEGIES",
    "UNET_FACTOR",
    "Config",
    "DataConfig",
    "FederationConfig",
    "MethodConfig",
    "ModelConfig",
    "PrivacyConfig",
    "SiteConfig",
    "PlanConfig",
    "TrainConfig",
    "apply_site_file",
    "read_site_file",
    "build_config",
    "build_section",
    "check_keys",
    "flat_dict",
    "load_config",
    "save_config",
]
