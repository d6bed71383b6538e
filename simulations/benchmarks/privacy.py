"""The privacy-utility curve: Dice against epsilon, for three starts of private fine-tuning, at one site or
across federated sites.

One site holds every labelled training case (the hippocampus's fixed 160/48 split by default) and
fine-tunes with record-level DP-SGD (one record = one patient) at each budget, the noise calibrated so
that the planned steps spend it (RDP accountant, ``privacy.delta``), and once without DP. With ``--sites N``
(N > 1) the same training cases are dealt to N simulated sites (about 40 each at 4) and every row is a real
federation (``--finetune-rounds`` rounds of fine-tuning, site DP at each site, each site's epsilon its own
accountant's); its curve is the federated test Dice per evaluated round. The rows:

- ``scratch``: no pretraining;
- ``amlp``: AMLP pretrained on the site's scans WITHOUT DP (``privacy.phases=finetune``: what the
  encoder learnt from those scans is not covered by the epsilon; the table says so);
- ``amlp_private``: AMLP pretrained under DP on ``--pretrain-share`` of the budget, then fine-tuned under
  DP on the rest (``privacy.phases=both``): the fine-tuning ledger starts from the pretraining's history,
  so the epsilon reported is the accountant's for both phases composed.

Federated, ``amlp`` pretrains in a federation of its own ``--pretrain-rounds`` rounds (without DP) once, kept
in ``RUNS/federated_amlp_encoder`` and shared by every ``amlp`` row; ``amlp_private`` pretrains under site DP
in each private row's own federation (``privacy.phases=both``, ``privacy.pretrain_share``), so each site's
ledger composes both phases.

Private rows run once per recipe (``--recipe NAME=K=V;K=V``: the private fine-tuning settings under
comparison, e.g. ``decoder_sgd=privacy.trainable=decoder;privacy.optimizer=sgd``; none given: the
defaults, named ``default``); a recipe's settings are all ``privacy.*`` and change nothing without DP, so
the non-private rows run once (recipe ``-``): they train everything with AdamW. The budget ``recipe`` runs
each recipe without DP as it stands, resolved for its start (only what it trains, its optimiser and
rate, no clipping, no noise): each private row's share of it says what the noise alone costs. Every row records the accountant's epsilon after the run, the
noise, the steps and the test-Dice curve (``--curve-every`` steps; federated: every round, or
``federation.eval_every``), and its share of the non-private Dice of the
same start; the summary pairs AMLP with scratch under DP seed by seed, within a recipe. Resumable: rows
already in ``--out`` are kept. ::

    python -m simulations.benchmarks.privacy --budgets none,1,3,8,16,32 --seeds 0 --seeds-at 8=0,1,2 \\
        --inits scratch,amlp,amlp_private --finetune-steps 300 --out results/privacy.json
    python -m simulations.benchmarks.privacy --sites 4 --budgets none,8 --finetune-rounds 10 \\
        --out results/privacy_federated.json --runs runs/privacy_federated
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from amlp_core import protocol as P
from amlp_core.config import Config, build_config
from amlp_core.engine.optim import private_recipe
from amlp_core.engine.pipeline import finetune
from amlp_core.engine.split import data_defaults, load_split
from amlp_core.privacy import epsilon_of
from amlp_core.privacy.ledger import LEDGER_FILE
from server.federation import ENCODER_DIR
from server.results import RunRecord
from simulations.benchmarks.common import (
    HIPPOCAMPUS,
    HIPPOCAMPUS_SPLIT,
    benchmark_parser,
    machine,
    paired_test,
    set_overrides,
    table,
    write_json,
    write_results,
)
from simulations.benchmarks.comparison.plan import run_once
from simulations.benchmarks.pretrain_gain import curve, pretrained

log = logging.getLogger(__name__)
INITS = ("scratch", "amlp", "amlp_private")
NONE = "none"  # the budget of the non-private row
#: The budget of a recipe's row without DP: what the private recipe trains, with its optimiser and rate, unclipped
#: and without noise (the reference for "the non-private Dice of the same recipe").
RECIPE = "recipe"
WITHOUT_DP = (NONE, RECIPE)  # the budgets that train without DP
CAVEAT = {
    "scratch": "",
    "amlp": "encoder pretrained on the sites' scans without DP: not covered by the epsilon",
    "amlp_private": "pretraining and fine-tuning under DP, composed",
}


def _parser():
    p = benchmark_parser(__doc__, "results/privacy.json")
    p.add_argument(
        "--budgets",
        default="none,1,3,8,16,32",
        help=f"epsilons ('{NONE}': without DP; '{RECIPE}': each recipe without DP, unclipped and without noise)",
    )
    p.add_argument("--inits", default=",".join(INITS), help=f"rows among {', '.join(INITS)}")
    p.add_argument("--seeds", default="0", help="fine-tuning seeds at every budget")
    p.add_argument("--seeds-at", action="append", default=[], metavar="EPS=SEEDS", help="more seeds at a budget")
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--curve-every", type=int, default=100)
    p.add_argument("--pretrain-epochs", type=int, default=50)
    p.add_argument("--pretrain-share", type=float, default=0.5, help="amlp_private: pretraining's share of epsilon")
    p.add_argument(
        "--recipe", action="append", default=[], metavar="NAME=K=V;K=V", help="a private recipe (privacy.* values)"
    )
    p.add_argument("--runs", default="runs/privacy")
    fed = p.add_argument_group("federated rows (--sites > 1)")
    fed.add_argument("--sites", type=int, default=1, help="1: one site holds every case; N: a federation of N sites")
    fed.add_argument("--finetune-rounds", type=int, default=10)
    fed.add_argument("--pretrain-rounds", type=int, default=10, help="the amlp rows' federated pretraining")
    fed.add_argument("--timeout", type=float, default=4 * 3600, help="seconds one federation may take")
    fed.add_argument("--cpus-per-site", type=int, default=1)
    fed.add_argument("--gpus-per-site", type=float, default=0.0, help="share of a GPU per site")
    return p


NO_RECIPE = "-"  # the recipe of a non-private row


def _recipe_of(row: dict[str, Any]) -> str:
    """A row's recipe (rows written before recipes were named: the defaults)."""
    return row.get("recipe", NO_RECIPE if row["budget"] == NONE else "default")


def recipes(items: list[str]) -> dict[str, dict[str, str]]:
    """``--recipe`` items as ``{name: {key: value}}`` (none: ``{"default": {}}``); a key outside ``privacy.``
    is refused: a recipe that changed anything else would not share its non-private reference."""
    out: dict[str, dict[str, str]] = {}
    for item in items or ["default="]:
        name, _, sets = item.partition("=")
        out[name] = set_overrides([kv for kv in sets.split(";") if kv])
        if bad := [k for k in out[name] if not k.startswith("privacy.")]:
            raise SystemExit(f"privacy: recipe {name!r} sets {', '.join(bad)}: a recipe may set privacy.* only")
    return out


def _seeds(args) -> dict[str, list[int]]:
    """The seeds of each budget: ``--seeds``, and ``--seeds-at EPS=a,b,c`` where given."""
    base = [int(s) for s in args.seeds.split(",") if s]
    extra = {eps: [int(s) for s in seeds.split(",") if s] for eps, seeds in (x.split("=", 1) for x in args.seeds_at)}
    return {b: extra.get(b, base) for b in args.budgets.split(",") if b}


def _private_pretraining(cfg: Config, args, budget: float, runs: Path, split) -> tuple[Path, list]:
    """AMLP pretrained under DP on ``--pretrain-share`` of ``budget`` (reused when finished): the run's folder
    and its ledger's history, the stretches fine-tuning's accountant continues from."""
    share = budget * args.pretrain_share
    pre_cfg = cfg.replace(privacy={"site_dp": True, "phases": "both", "budget": share})
    folder = pretrained(pre_cfg, args.method, args.pretrain_epochs, 0, runs / f"private_{share:g}", split)["folder"]
    history = json.loads((folder / LEDGER_FILE).read_text())["history"]
    return folder, history


def _row(
    cfg: Config, init: str, recipe: str, sets: dict[str, str], budget: str, seed: int, args, split, runs: Path
) -> dict[str, Any]:
    private = budget not in WITHOUT_DP
    run = runs / f"finetune_{init}_eps{budget}_s{seed}{'' if recipe in ('default', NO_RECIPE) else '_' + recipe}"
    folder, spent = None, []
    if init == "amlp" or (init == "amlp_private" and not private):
        folder = pretrained(cfg, args.method, args.pretrain_epochs, 0, runs, split)["folder"]
    elif init == "amlp_private":
        folder, spent = _private_pretraining(cfg, args, float(budget), runs, split)
    ft = build_config(sets, base=cfg) if budget != NONE else cfg
    ft = ft.replace(
        train={"seed": seed, "finetune_steps": args.finetune_steps, "eval_every": args.curve_every},
        privacy={"site_dp": private, **({"budget": float(budget)} if private else {})},
    )
    if budget == RECIPE:
        ft = ft.replace(privacy=resolved_recipe(ft, folder is not None))
    if run.exists():
        shutil.rmtree(run)  # a row not in the JSON is redone from its start, with a fresh ledger
    if spent:  # fine-tuning's accountant goes on from the pretraining's stretches (its own noise, calibrated)
        run.mkdir(parents=True)
        ledger = {"format": 1, "delta": ft.privacy.delta, "budget": float(budget), "noise_multiplier": None}
        (run / LEDGER_FILE).write_text(json.dumps({**ledger, "history": spent, "rounds": [], "epsilon": 0.0}))
    result = finetune(ft, run, init=folder, split=split)
    ledger = json.loads((run / LEDGER_FILE).read_text()) if private else {}
    return _record(
        (init, recipe, sets, budget, seed),
        trained=_trained(ft, folder is not None),
        epsilon=epsilon_of([tuple(h) for h in ledger["history"]], ft.privacy.delta) if private else None,
        noise_multiplier=ledger.get("noise_multiplier"),
        steps=result["steps"],
        train_seconds=result["train_seconds"],
        dice_mean=result["dice_mean"],
        curve=curve(run),
    )


def resolved_recipe(cfg: Config, pretrained: bool) -> dict[str, Any]:
    """``cfg``'s private recipe resolved for its start, as explicit ``privacy`` values: set without DP, fine-tuning
    trains it as it stands (:func:`~amlp_core.engine.optim.finetune_optimizer`)."""
    trainable, optimizer, rate = private_recipe(dataclasses.replace(cfg.privacy, site_dp=True), cfg.train, pretrained)
    return {"trainable": trainable, "optimizer": optimizer, "lr": rate}


def _trained(cfg: Config, pretrained: bool) -> str:
    """What a row trained, with what, at which peak rate, in words: its recipe resolved for its start (under DP,
    or set without it), else everything with AdamW."""
    if not cfg.privacy.site_dp and cfg.privacy.trainable == "auto":
        return f"all, adamw {cfg.train.finetune_lr:g}"
    trainable, optimizer, rate = private_recipe(cfg.privacy, cfg.train, pretrained)
    return f"{trainable}, {optimizer} {rate:g}"


def _record(cell: tuple[str, str, dict[str, str], str, int], **measured: Any) -> dict[str, Any]:
    """A row of the JSON: its cell ``(init, recipe, recipe's settings, budget, seed)``, what was measured, and
    the caveat of its start."""
    init, recipe, sets, budget, seed = cell
    out = {"init": init, "recipe": recipe, "recipe_sets": sets, "budget": budget, "seed": seed, **measured}
    return {**out, "caveat": CAVEAT[init]}


FEDERATED_ENCODER = "federated_amlp_encoder"  # under --runs: the amlp rows' shared federated pretraining


def _federated_row(
    flat: dict[str, Any], init: str, recipe: str, sets: dict[str, str], budget: str, seed: int, args, runs: Path
) -> dict[str, Any]:
    """One row as a federation of ``--sites`` simulated sites (:func:`run_once`): its final federated test Dice,
    the largest epsilon a site's accountant spent, and the Dice of every evaluated round."""
    private = budget not in WITHOUT_DP
    run = runs / f"federated_{init}_eps{budget}_s{seed}{'' if recipe in ('default', NO_RECIPE) else '_' + recipe}"
    encoder = runs / FEDERATED_ENCODER
    start: dict[str, Any] = {"federation.pretrain_rounds": 0, "federation.init_encoder": ""}
    if init == "amlp_private" and private:  # private pretraining in this row's own federation, ledgers composed
        start.update({"federation.pretrain_rounds": args.pretrain_rounds, "privacy.phases": "both"})
        start["privacy.pretrain_share"] = args.pretrain_share
    elif init != "scratch" and (encoder / "checkpoint.pt").exists():
        start["federation.init_encoder"] = str(encoder.resolve())
    elif init != "scratch":  # the first amlp row pretrains (without DP) and leaves its encoder to the others
        start["federation.pretrain_rounds"] = args.pretrain_rounds
    cfg = build_config(
        {
            **flat,
            **(sets if budget != NONE else {}),
            **start,
            "method.name": args.method,
            "train.seed": seed,
            "federation.sites": args.sites,
            "federation.min_sites": args.sites,
            "federation.finetune_rounds": args.finetune_rounds,
            "federation.run_dir": str(run.resolve()),
            "federation.resume": False,
            "privacy.site_dp": private,
            **({"privacy.budget": float(budget)} if private else {}),
        }
    )
    if budget == RECIPE:
        cfg = cfg.replace(privacy=resolved_recipe(cfg, init != "scratch"))
    result, _ = run_once(cfg, args, f"{init} ({recipe}) at epsilon {budget}, seed {seed}, {args.sites} sites")
    if init == "amlp" and start["federation.pretrain_rounds"]:
        shutil.rmtree(encoder, ignore_errors=True)
        shutil.copytree(run / ENCODER_DIR, encoder)
    record = RunRecord.read(run)
    rounds = record.select(phase=P.FINETUNE, kind=P.EVALUATE, aggregate=True)
    return _record(
        (init, recipe, sets, budget, seed),
        trained=_trained(cfg, init != "scratch"),
        epsilon=result.get("epsilon"),
        noise_multiplier=None,
        steps=None,
        rounds=args.finetune_rounds,
        train_seconds=result["finetune_seconds"],
        dice_mean=result[P.DICE_MEAN],
        curve=[{"round": r.round, "test_dice_mean": r.number(P.DICE_MEAN)} for r in rounds],
    )


def share(dice: float, reference: list[float]) -> float | None:
    """``dice`` as a share of the mean of ``reference`` (the same start's Dice without DP, seed by seed); None
    when there is no reference or it is 0 (a reference that never segments measures nothing)."""
    mean = sum(reference) / len(reference) if reference else 0.0
    return dice / mean if mean > 0 else None


def summary(rows: list[dict]) -> tuple[list[dict], str]:
    """Per start and budget: mean Dice over seeds, its share of the same start's non-private Dice and (where the
    budget ``recipe`` ran) of the same recipe's Dice without DP; per budget, AMLP minus scratch paired by seed
    (with its test)."""
    out = []
    cells = dict.fromkeys((_recipe_of(r), r["budget"]) for r in rows)
    for init in INITS:
        plain = [r["dice_mean"] for r in rows if r["init"] == init and r["budget"] == NONE]
        for recipe, budget in cells:
            mine = [r for r in rows if (r["init"], _recipe_of(r), r["budget"]) == (init, recipe, budget)]
            if not mine:
                continue
            dice = sum(r["dice_mean"] for r in mine) / len(mine)
            same = [r["dice_mean"] for r in rows if (r["init"], _recipe_of(r), r["budget"]) == (init, recipe, RECIPE)]
            entry = {
                "init": init,
                "recipe": recipe,
                "trained": mine[0].get("trained", ""),
                "budget": budget,
                "seeds": len(mine),
                "epsilon": max((r["epsilon"] or 0.0) for r in mine) if budget not in WITHOUT_DP else None,
                "dice_mean": dice,
                "share_of_no_dp": share(dice, plain),
                "share_of_recipe": share(dice, same) if budget != RECIPE else None,
                "caveat": CAVEAT[init],
            }
            if init != "scratch":
                base = {
                    r["seed"]: r["dice_mean"]
                    for r in rows
                    if (r["init"], _recipe_of(r), r["budget"]) == ("scratch", recipe, budget)
                }
                diffs = [r["dice_mean"] - base[r["seed"]] for r in mine if r["seed"] in base]
                if diffs:
                    entry["minus_scratch"] = paired_test(diffs)
            out.append(entry)

    def fmt(v: Any) -> str:
        return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [
        {
            **{k: fmt(e[k]) for k in ("init", "recipe", "trained", "budget", "seeds", "epsilon", "dice_mean")},
            "share_of_no_dp": fmt(e["share_of_no_dp"]),
            "share of the recipe without DP": fmt(e["share_of_recipe"]),
            "minus scratch (paired)": fmt(e.get("minus_scratch", {}).get("mean"))
            + (f" ({e['minus_scratch']['verdict']})" if "minus_scratch" in e else ""),
            "caveat": e["caveat"],
        }
        for e in out
    ]
    columns = [
        *("init", "recipe", "trained", "budget", "seeds", "epsilon", "dice_mean", "share_of_no_dp"),
        *("share of the recipe without DP", "minus scratch (paired)", "caveat"),
    ]
    return out, table(lines, columns)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    fixed = HIPPOCAMPUS_SPLIT if Path(args.data).resolve() == HIPPOCAMPUS.resolve() else {}
    flat = {**data_defaults(args.data), **fixed, "train.label_fraction": 1.0, **set_overrides(args.set)}
    cfg = build_config(flat)
    split = load_split(cfg)
    runs, out = Path(args.runs), Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    if previous.get("rows") and previous.get("sites", 1) != args.sites:
        raise SystemExit(
            f"privacy: {out} holds rows of {previous.get('sites', 1)} site(s), not {args.sites}: give another --out"
        )
    rows: list[dict] = previous.get("rows", [])
    done = {(r["init"], _recipe_of(r), r["budget"], r["seed"]) for r in rows}
    named = recipes(args.recipe)
    header = {
        "benchmark": "privacy",
        "machine": machine(),
        "sites": args.sites,
        **(
            {"finetune_rounds": args.finetune_rounds, "pretrain_rounds": args.pretrain_rounds} if args.sites > 1 else {}
        ),
        "train_cases": len(split.train),
        "test_cases": len(split.test),
        "delta": cfg.privacy.delta,
        "max_grad_norm": cfg.privacy.max_grad_norm,
        "batch_size": cfg.train.batch_size,
        **({"finetune_steps": args.finetune_steps} if args.sites == 1 else {}),
        "pretrain_epochs": args.pretrain_epochs,
        "pretrain_share": args.pretrain_share,
        "overrides": args.set,
        "recipes": {**previous.get("recipes", {}), **named},  # every invocation's, as the rows hold them
    }
    for budget, seeds in _seeds(args).items():
        for seed in seeds:
            for init in [i for i in args.inits.split(",") if i]:
                if init not in INITS:
                    raise SystemExit(f"privacy: unknown row {init!r} (one of {', '.join(INITS)})")
                for recipe, sets in named.items() if budget != NONE else [(NO_RECIPE, {})]:
                    if (init, recipe, budget, seed) in done:
                        continue
                    if args.sites > 1:
                        rows.append(_federated_row(flat, init, recipe, sets, budget, seed, args, runs))
                    else:
                        rows.append(_row(cfg, init, recipe, sets, budget, seed, args, split, runs))
                    log.info(
                        "%s (%s) at epsilon %s, seed %d: Dice %.4f", init, recipe, budget, seed, rows[-1]["dice_mean"]
                    )
                    write_json(out, {**header, "rows": rows})  # the row is kept before anything reads it
                    write_json(out, {**header, "rows": rows, "summary": summary(rows)[0]})
    stats, markdown = summary(rows)
    write_results(out, {**header, "rows": rows, "summary": stats}, markdown)
    return {**header, "rows": rows, "summary": stats}


if __name__ == "__main__":
    main()
