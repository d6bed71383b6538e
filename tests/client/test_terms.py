"""A site sets its own terms (client/terms.py): the ClientApp, given a site file, refuses a run that asks
for less, and says why. Driven with real Flower query messages (the declaration at a run's start)."""

from __future__ import annotations

import pytest
import yaml
from flwr.app import ConfigRecord, RecordDict

from amlp_core import protocol as P
from amlp_core.data import write_phantom_dataset
from amlp_core.data.plan import plan_text
from client.app import app
from tests.client.helpers import cfg as _cfg
from tests.client.helpers import context as _context
from tests.client.helpers import message as _message
from tests.client.helpers import phantom_plan


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("terms") / "data", n=6, shape=(32, 32), seed=0)


def _ask(tmp_path, data, site: dict, **run):
    """The site's answer to the run's first message, the site file holding ``site`` (plus its data and state)."""
    path = tmp_path / "hospital.yaml"
    body = {"site": {"name": "st-mary", "state_dir": str(tmp_path / "state"), **site.pop("site", {})}}
    body["data"] = {"path": str(data)}
    path.write_text(yaml.safe_dump({**body, **site}))
    cfg = _cfg(tmp_path, **run)
    ctx = _context(cfg, 0, node_config={"site-config": str(path)})
    plan = ConfigRecord({P.PLAN: plan_text(phantom_plan(cfg))})  # the declaration query carries the plan
    return app(_message(RecordDict({P.CONFIG: plan}), ctx.node_id, "query"), ctx)


DP = {"privacy.site_dp": True, "privacy.phases": "both", "privacy.budget": 3.0}


@pytest.mark.parametrize(
    "site, run, reason",
    [
        ({"site": {"max_epsilon": 4.0}}, {}, "requires site DP (site.max_epsilon=4 in its site file)"),
        ({"site": {"max_epsilon": 4.0}}, {**DP, "privacy.budget": 8.0}, "privacy.budget=8 exceeds"),
        ({"site": {"max_epsilon": 4.0}}, {**DP, "privacy.phases": "finetune"}, "leaves pretrain without it"),
        ({"privacy": {"budget": 2.0}}, {}, "requires site DP (privacy.budget=2 in its site file)"),
        ({"site": {"require_secure_aggregation": True}}, {}, "requires secure aggregation"),
        ({"site": {"accept_methods": "mae,ahm"}}, {}, "pretrains with amlp; this site accepts mae, ahm"),
        ({"site": {"accept_phases": "finetune"}}, {}, "trains in the pretrain phase"),
        # The run's own site section cannot lower the site's terms.
        ({"site": {"max_epsilon": 4.0}}, {"site.max_epsilon": 0.0}, "requires site DP"),
    ],
)
def test_a_run_that_asks_for_less_is_refused_saying_why(tmp_path, data, site, run, reason):
    reply = _ask(tmp_path, data, site, **run)
    assert reply.has_error()
    assert reply.error.reason.startswith("site st-mary: the run does not meet this site's terms: ")
    assert reason in reply.error.reason


@pytest.mark.parametrize(
    "site, run",
    [
        ({"site": {"max_epsilon": 4.0}}, DP),
        ({"site": {"accept_methods": "amlp", "accept_phases": "pretrain,finetune"}}, {}),
        ({"site": {"accept_phases": "finetune"}}, {"federation.pretrain_rounds": 0}),
    ],
)
def test_a_run_that_meets_the_terms_is_answered(tmp_path, data, site, run):
    reply = _ask(tmp_path, data, site, **run)
    assert not reply.has_error(), reply.error.reason
    counts = reply.content[P.METRICS]
    assert counts[P.DECLARED_TRAIN] + counts[P.DECLARED_TEST] == 6


def test_data_and_state_come_from_the_site_file_only(tmp_path, data):
    path = tmp_path / "hospital.yaml"
    path.write_text(yaml.safe_dump({"site": {"name": "st-mary"}, "data": {"path": str(data)}}))
    cfg = _cfg(tmp_path, **{"site.state_dir": str(tmp_path / "chosen-by-the-submitter")})
    ctx = _context(cfg, 0, node_config={"site-config": str(path)})
    reply = app(_message(RecordDict({P.CONFIG: ConfigRecord({})}), ctx.node_id, "query"), ctx)
    assert reply.has_error() and "configuration problem" in reply.error.reason
    assert not (tmp_path / "chosen-by-the-submitter").exists()
