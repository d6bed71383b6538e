"""A site's terms (its site file's ``site.*`` requirements): the site refuses a run that asks for less.

The refusal names the term and what the run asks, and reaches the run's results in full: it says
nothing about the site's data.
"""

from __future__ import annotations

from typing import Any

from amlp_core.config import Config
from amlp_core.errors import AMLPError


class TermsRefused(AMLPError):
    """The run does not meet this site's terms; the message says which and why."""


def trained_phases(cfg: Config) -> list[str]:
    """The phases in which the run trains at the sites."""
    return (["pretrain"] if cfg.federation.pretrain_rounds > 0 else []) + ["finetune"]


def refusals(cfg: Config, own: dict[str, Any]) -> list[str]:
    """Every way the run (``cfg``, the site file applied) falls short of the site's terms; ``own`` is
    what the site file itself sets (flat keys)."""
    site, privacy, fed = cfg.site, cfg.privacy, cfg.federation
    out = []
    phases = trained_phases(cfg)
    for phase in phases:
        if phase not in site.phases:
            out.append(f"the run trains in the {phase} phase; this site takes part in {', '.join(site.phases)} only")
    if "pretrain" in phases and site.methods and cfg.method.name not in site.methods:
        out.append(f"the run pretrains with {cfg.method.name}; this site accepts {', '.join(site.methods)}")
    if site.require_secure_aggregation and not fed.secure_aggregation:
        out.append("this site requires secure aggregation; the run has federation.secure_aggregation=false")
    wants_dp = site.max_epsilon > 0 or "privacy.budget" in own
    if wants_dp and not privacy.site_dp:
        why = f"site.max_epsilon={site.max_epsilon:g}" if site.max_epsilon > 0 else f"privacy.budget={privacy.budget:g}"
        out.append(f"this site requires site DP ({why} in its site file); the run has privacy.site_dp=false")
    elif wants_dp:
        open_phases = [p for p in phases if not privacy.private(p)]
        if open_phases:
            out.append(
                f"this site requires DP in every phase it trains in; the run's privacy.phases={privacy.phases} "
                f"leaves {', '.join(open_phases)} without it"
            )
        if site.max_epsilon > 0 and privacy.budget > site.max_epsilon:
            out.append(
                f"the run's privacy.budget={privacy.budget:g} exceeds this site's site.max_epsilon={site.max_epsilon:g}"
            )
    return out


def check_terms(cfg: Config, own: dict[str, Any]) -> None:
    """TermsRefused naming every unmet term of the site."""
    problems = refusals(cfg, own)
    if problems:
        raise TermsRefused("the run does not meet this site's terms: " + "; ".join(problems))
