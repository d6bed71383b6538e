"""Names of everything that travels between the server and the sites, defined once.

A training or evaluation message holds one :class:`ArrayRecord` under :data:`ARRAYS`
(the weights), one :class:`ConfigRecord` under :data:`CONFIG` (the instructions below).
A reply holds the weights (train only), one :class:`MetricRecord` under :data:`METRICS`
(aggregate numbers only, never per-case values) and one :class:`ConfigRecord` under
:data:`SITE` (the site's name); the answer to the first QUERY holds the site's :data:`FINGERPRINT`
(aggregates too). Nothing else leaves a site.

Every key is snake_case except the two that Flower itself reads or writes: ``num-examples`` (its
strategies weigh by it) and ``proximal-mu`` (its FedProx sets it).
"""

import json
from enum import StrEnum

# Record keys (Flower's strategies use "arrays" and "config"; kept so that they work unchanged).
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"

# Instructions in CONFIG.
PHASE = "phase"  # PRETRAIN | FINETUNE


class Phase(StrEnum):
    """The two phases of a federation: pretraining the encoder, then fine-tuning the segmentation network."""

    PRETRAIN = "pretrain"
    FINETUNE = "finetune"


PRETRAIN: str = Phase.PRETRAIN.value  # (plain strings: what travels and what the records hold)
FINETUNE: str = Phase.FINETUNE.value
#: The kinds of round in the run's record: a training round, and fine-tuning's evaluation after it.
TRAIN, EVALUATE = "train", "evaluate"
GLOBAL_ROUND = "global_round"  # this phase's round, 1-based, continuing across restarts
TOTAL_ROUNDS = "total_rounds"  # rounds of this phase in the whole run
LOCAL_EPOCHS = "local_epochs"
#: Fine-tuning rounds: optimiser steps per site per round (federation.finetune_local_steps; 0: the site
#: takes local-epochs epochs over all its labelled cases, whatever the label fraction keeps).
LOCAL_STEPS = "local_steps"
EXPECTED_RATIO = "expected_mask_ratio"  # AMR ratio the server expects at the round's start
CONFIG_DIGEST = "config_digest"  # hash of the model and method config the server runs
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
#: Fine-tuning rounds: the semi-supervised settings (JSON of every ``train.semi_*`` value) the server runs;
#: a site with others refuses the round, naming both.
SEMI = "semi_supervised"
PLAN = "plan"  # the run's plan (amlp_core/data/plan.py: JSON of the decided plan section), in every message
ARRAY_KEYS = "array_keys"  # SecAgg+ rounds: JSON list naming the legacy FitIns arrays, in order
WEIGHT_KEY = "weight_key"  # SecAgg+ rounds: the metric the site weights its update by (the strategy's)

# Metrics in METRICS (Flower weights by NUM_EXAMPLES: the number of samples, not batches).
NUM_EXAMPLES = "num-examples"
LOSS = "loss"
DICE_MEAN = "dice_mean"  # evaluation: the mean over the classes of the per-case Dice (DICE_PREFIX + k per class)
DICE_PREFIX = "dice_"
SECONDS = "seconds"  # the run's record: a round's seconds at the server
MASK_RATIO = "mask_ratio"
EPSILON = "epsilon"  # site DP: the site's cumulative epsilon after this round (at privacy.delta)
#: Fine-tuning replies: the unlabelled cases the round learnt from (0: it trained on its labels only).
SEMI_UNLABELLED = "semi_unlabelled"
UNIT_WEIGHT = "unit_weight"  # always 1: equal site weights, which Flower's accounted server DP requires

# A site's declaration, its reply to the server's QUERY message (server/validation.py bounds every
# later num-examples by it): the number of cases behind each phase's replies.
DECLARED_TRAIN = "train_cases"  # pretraining: the site's training images
DECLARED_LABELLED = "labelled_cases"  # fine-tuning: its labelled subset (train.label_fraction)
DECLARED_TEST = "test_cases"  # evaluation: its test cases
#: The declaration that bounds a reply of each kind.
DECLARED_FOR = {PRETRAIN: DECLARED_TRAIN, FINETUNE: DECLARED_LABELLED, EVALUATE: DECLARED_TEST}

#: The reply to a QUERY without a PLAN: the site's fingerprint (a ConfigRecord of aggregates only, from
#: amlp_core.data.plan.Fingerprint), which the server decides the plan from. A QUERY with the PLAN is
#: answered with the declaration above.
FINGERPRINT = "fingerprint"

# Statuses of a site's reply in the run's record.
OK = "ok"
ERROR = "error"  # the site answered with an error
MISSING = "missing"  # no reply before the round timeout
REJECTED = "rejected"  # the server refused the reply (server/validation.py)

# The run's record (server/results.py): the row of a whole round, beside the sites' rows.
ALL_SITES = "ALL"

# Site description in SITE.
SITE_NAME = "name"
CLASS_NAMES = "class_names"  # JSON {"0": "background", ...}


def semi_settings(cfg) -> str:
    """The semi-supervised settings of a :class:`amlp_core.config.Config` as :data:`SEMI` carries them."""
    train = cfg.to_dict()["train"]
    return json.dumps({k: v for k, v in sorted(train.items()) if k.startswith("semi_")}, separators=(",", ":"))


def declared_for(cfg) -> dict[str, str]:
    """The declared count that bounds each kind of reply's ``num-examples`` (:data:`DECLARED_FOR`); fine-tuning's
    is every training case when a site is weighted by its labelled cases and its unlabelled pool
    (``train.semi_site_weight=all`` with a semi-supervised loss): a :class:`amlp_core.config.Config`."""
    if cfg.train.semi_supervised != "none" and cfg.train.semi_site_weight == "all":
        return {**DECLARED_FOR, FINETUNE: DECLARED_TRAIN}
    return DECLARED_FOR


def config_digest(cfg) -> str:
    """What the server and every site must agree on: the model and the method (a
    :class:`amlp_core.config.Config`)."""
    return cfg.digest("model", "method")
