"""The two-phase federation: pretraining rounds on the encoder, then fine-tuning rounds.

After every round the global weights, the phase and round, the strategy's own state and
the run's record are checkpointed atomically in ``federation.run_dir``. With
``federation.resume`` a stopped run continues from there and ends where an uninterrupted
run with the same seeds ends; a checkpoint made with another configuration is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted

from amlp_core import protocol as P
from amlp_core.atomic import atomic_write_text
from amlp_core.config import Config, PlanConfig, save_config
from amlp_core.data.plan import describe, plan_text, planned_config, read_plan_text
from amlp_core.engine.artefacts import (
    SERVER_CHECKPOINT,
    ServerCheckpoint,
    export_encoder,
    export_segmentation,
    load_pretrained_shared,
    pretraining_method,
    segmentation_meta,
)
from amlp_core.engine.board import BOARD_DIR, Board
from amlp_core.engine.lesions import EMPTY_CASES, EMPTY_HITS, LESION_DICE
from amlp_core.engine.optim import private_recipe
from amlp_core.engine.weights import initial_segmentation_state, initial_shared_state
from amlp_core.errors import CheckpointError
from amlp_core.methods import mask_ratio_at
from amlp_core.models import has_encoder
from amlp_core.privacy import coverage
from amlp_core.schedules import federated_progress
from server import rounds
from server.report import write_report
from server.results import ALL_SITES, BUDGET, COVERS, RunResults
from server.secagg import SecAggRound
from server.strategies import build_strategy, restore_strategy_state, server_accountant, strategy_state
from server.validation import Declarations, NormHistory

log = logging.getLogger(__name__)
#: One line per phase-round with the overall figures: what ``fedamlp simulate`` shows on the console.
progress_log = logging.getLogger("server.progress")
CHECKPOINT = SERVER_CHECKPOINT
MODEL_DIR = "model"
ENCODER_DIR = "encoder"  # the aggregated encoder after pretraining, a pretraining checkpoint folder
FAILED = "FAILED"  # written by the ServerApp when the run fails: one line saying why
#: Settings that may change between a stopped run and its resumption.
PLAN_FILE = "plan.json"  # the decided plan (as every message carries it), beside the user's config.yaml
SERVER_EPSILON = "server_epsilon"  # results: client-level epsilon spent so far by server DP


def run_digest(cfg: Config) -> str:
    """The checkpoint's guard: :meth:`Config.run_digest` (a resumed run must have the same)."""
    return cfg.run_digest()


def check_resumable(cfg: Config) -> None:
    """CheckpointError when ``federation.resume`` finds a checkpoint made with another configuration.

    Called before anything is written, so that a refused resume leaves the run folder as it was.
    """
    path = Path(cfg.federation.run_dir) / CHECKPOINT
    if cfg.federation.resume and path.exists():
        _saved_run(path, cfg)


def _saved_run(path: Path, cfg: Config) -> ServerCheckpoint:
    """The server checkpoint at ``path``; CheckpointError when it was made with another configuration."""
    saved = ServerCheckpoint.load(path)
    if saved.digest != run_digest(cfg):
        raise CheckpointError(
            f"checkpoint {path} was made with a different configuration; refusing to resume "
            "(start a new run_dir, or restore the original settings)"
        )
    return saved


#: What the summary says when no site has test cases to evaluate on.
NO_TEST_CASES = "skipped: no site has test cases (data.test_fraction=0)"


class StopRequested(Exception):
    """``federation.stop_after_rounds`` rounds are done; the checkpoint allows resuming."""


@dataclasses.dataclass
class Progress:
    phase: str = P.PRETRAIN
    done: int = 0  # rounds of ``phase`` completed


def privacy_info(cfg: Config) -> dict[str, str]:
    """The run's privacy settings, as the results' summary states them."""
    p, f, info = cfg.privacy, cfg.federation, {}
    if f.secure_aggregation:
        info["secure aggregation"] = (
            f"SecAgg+ on every training round (secrets shared with "
            f"{f.secagg_num_shares:.0%} of the sites, {f.secagg_reconstruction_threshold:.0%} "
            f"of the shares needed)"
        )
    if p.site_dp:
        noise = f"noise multiplier {p.noise_multiplier}" if p.noise_multiplier else "noise calibrated to the budget"
        info["site DP"] = (
            f"DP-SGD ({p.phases}), budget epsilon {p.budget:g} per site at delta {p.delta:g}, "
            f"clip {p.max_grad_norm:g}, {noise}"
        )
        info[BUDGET] = p.budget
        info[COVERS] = coverage(cfg)
    if p.site_dp or p.trainable != "auto":
        # Without site DP a set recipe still trains alone (unclipped, no noise): the reference a private run is
        # measured against, which the summary must name as such.
        trainable, optimizer, rate = private_recipe(p, cfg.train, f.encoder_pretrained)
        key = "private fine-tuning" if p.site_dp else "the private recipe without DP"
        info[key] = f"trains {trainable}, {optimizer} at {rate:g} (privacy.trainable={p.trainable})"
    if p.server_dp:
        cap = f", cap epsilon {p.server_budget:g}" if p.server_budget else ""
        info["server DP"] = (
            f"client-level, fixed clipping {p.server_clipping_norm:g}, noise multiplier "
            f"{p.server_noise_multiplier:g} ({p.phases}){cap}, delta {p.delta:g}"
        )
    return info


def _fmt_metrics(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def round_line(
    phase: str,
    rnd: int,
    total: int,
    trained: rounds.RoundOutcome,
    train: dict[str, Any],
    evaluated: dict[str, Any],
    seconds: float,
) -> str:
    """The round in one line: sites ok, the aggregated loss (and masking ratio), the pooled Dice (lesion Dice
    and normal images predicted empty where the test images say), epsilon where spent, and the seconds."""
    parts = [f"{phase} round {rnd}/{total}: {len(trained.ok)}/{len(trained.replies)} sites ok"]
    if isinstance(train.get(P.LOSS), float):
        parts.append(f"loss {train[P.LOSS]:.4f}")
    if phase == P.PRETRAIN and isinstance(train.get(P.MASK_RATIO), float):
        parts.append(f"mask ratio {train[P.MASK_RATIO]:.2f}")
    if isinstance(evaluated.get(P.DICE_MEAN), float):
        parts.append(f"Dice {evaluated['dice_mean']:.4f}")
    if evaluated.get(EMPTY_CASES):
        parts.append(
            f"lesion Dice {evaluated.get(LESION_DICE, float('nan')):.4f}, normal images predicted empty "
            f"{evaluated.get(EMPTY_HITS, 0)} of {evaluated[EMPTY_CASES]}"
        )
    site_eps = [float(r.metrics[P.EPSILON]) for r in trained.replies if r.status == P.OK and P.EPSILON in r.metrics]
    if site_eps:
        parts.append(f"site epsilon up to {max(site_eps):.2f}")
    if isinstance(train.get(SERVER_EPSILON), float):
        parts.append(f"server epsilon {train[SERVER_EPSILON]:.2f}")
    parts.append(f"{seconds:.0f} s")
    return ", ".join(parts)


def _bytes(arrays: ArrayRecord) -> int:
    return sum(a.numpy().nbytes for a in arrays.values())


class Federation:
    """Runs the two phases on a Flower grid, one explicit round at a time."""

    def __init__(self, grid: Grid, cfg: Config) -> None:
        self.grid, self.cfg, self.fed = grid, cfg, cfg.federation
        self.run_dir = Path(self.fed.run_dir)
        self.results = RunResults(self.run_dir / "results")
        self.rounds_this_process = 0
        self.started = False  # past the start's checks: from here a failure is written to RUN_DIR/FAILED
        self.class_names: dict[str, str] = {}
        self.accountant = server_accountant(self.fed, cfg.privacy)  # server DP: one for the whole run
        # What each site holds (bounds num-examples); a first answer may wait for the site to start.
        self.declared = Declarations(
            timeout=self.fed.connect_timeout + self.fed.round_timeout, declared_for=P.declared_for(cfg)
        )
        self.norms = NormHistory()  # each phase's last reference update norm (server/validation.py)
        self.board: Board | None = None  # RUN_DIR/tensorboard, opened at the first recorded round
        self.plan = cfg.plan  # decided at the start of the run (decide_plan)
        self.saved_plan: str | None = None  # a resumed run's

    # -- checkpoint ----------------------------------------------------------------------
    def _save(self, progress: Progress, arrays: ArrayRecord, strategy) -> None:
        ServerCheckpoint(
            phase=progress.phase,
            round=progress.done,
            digest=run_digest(self.cfg),
            arrays=arrays.to_torch_state_dict(),
            strategy=strategy_state(strategy),
            rows=self.results.rows,
            class_names=self.class_names,
            accountant=json.dumps(self.accountant.state_dict()) if self.accountant else None,
            plan=plan_text(self.plan),
        ).save(self.run_dir / CHECKPOINT)

    def _load(self) -> tuple[Progress, ArrayRecord, dict] | None:
        path = self.run_dir / CHECKPOINT
        if not path.exists():
            log.info("federation.resume is set but %s has no checkpoint: starting afresh", self.run_dir)
            return None
        saved = _saved_run(path, self.cfg)  # (read once: the checks and the state)
        self.results.rows = list(saved.rows)
        self.class_names = dict(saved.class_names)
        self.saved_plan = saved.plan
        if self.accountant is not None and saved.accountant:
            self.accountant.load_state_dict(json.loads(saved.accountant))
        log.info("resuming after %s round %d from %s", saved.phase, saved.round, path)
        return Progress(saved.phase, saved.round), ArrayRecord(saved.arrays), saved.strategy

    # -- rounds --------------------------------------------------------------------------
    def _instructions(self, phase: str, rnd: int, total: int) -> ConfigRecord:
        record = {
            P.PHASE: phase,
            P.GLOBAL_ROUND: rnd,
            P.TOTAL_ROUNDS: total,
            P.LOCAL_EPOCHS: self.fed.local_epochs,
            P.CONFIG_DIGEST: P.config_digest(self.planned_config()),
            P.PLAN: plan_text(self.plan),
        }
        if phase == P.PRETRAIN:
            t = federated_progress(rnd, 0, self.fed.local_epochs, total)
            record[P.EXPECTED_RATIO] = mask_ratio_at(self.cfg.method, t)
        else:  # fine-tuning is counted in optimiser steps (each site checks it plans the same)
            record[P.LOCAL_STEPS] = self.fed.finetune_local_steps
            record[P.SEMI] = P.semi_settings(self.cfg)
        return ConfigRecord(record)

    def _record(
        self, phase: str, rnd: int, kind: str, outcome: rounds.RoundOutcome, aggregated: dict, bytes_down: int
    ) -> None:
        for r in outcome.replies:
            row = {"phase": phase, "round": rnd, "kind": kind, "site": r.site, "status": r.status, **r.metrics}
            log.info(
                "%s round %d %s, %s: %s",
                phase,
                rnd,
                kind,
                r.site,
                _fmt_metrics(r.metrics) if r.status == P.OK else f"{r.status}: {r.error}",
            )
            if r.error:
                row["error"] = r.error
            if kind == "train" and r.status == P.OK:
                row.update(bytes_down=bytes_down, bytes_up=_bytes(r.message.content[P.ARRAYS]))
            self.results.add(**row)
            if r.status == P.OK and not self.class_names and P.SITE in r.message.content.config_records:
                self.class_names = json.loads(str(r.message.content[P.SITE][P.CLASS_NAMES]))
        self.results.add(
            phase=phase,
            round=rnd,
            kind=kind,
            site=ALL_SITES,
            status=P.OK,
            sites_ok=len(outcome.ok),
            sites_asked=len(outcome.replies),
            seconds=round(outcome.seconds, 2),
            **aggregated,
        )
        self._board_round(phase, rnd, kind, outcome, aggregated)
        log.info(
            "%s round %d %s, all sites: %d/%d ok; %s",
            phase,
            rnd,
            kind,
            len(outcome.ok),
            len(outcome.replies),
            _fmt_metrics(aggregated),
        )

    def _phase(
        self, phase: str, arrays: ArrayRecord, start: int, total: int, strategy_saved: dict | None
    ) -> ArrayRecord:
        private = self.accountant is not None and self.cfg.privacy.private(phase)
        strategy = build_strategy(
            self.fed,
            evaluate=phase == P.FINETUNE,
            privacy=self.cfg.privacy,
            accountant=self.accountant if private else None,
        )
        train_round = SecAggRound(self.fed) if self.fed.secure_aggregation else rounds.train_round
        if strategy_saved:
            restore_strategy_state(strategy, strategy_saved)
        f = self.fed
        for rnd in range(start, total + 1):
            if f.stop_after_rounds and self.rounds_this_process >= f.stop_after_rounds:
                raise StopRequested
            round_started = time.monotonic()
            try:
                instructions = self._instructions(phase, rnd, total)
                arrays, metrics, outcome = train_round(
                    rounds.ServerRound(self.grid, strategy, rnd, arrays, instructions, f, self.declared, self.norms)
                )
            except PrivacyBudgetExhausted as e:
                raise rounds.FederationError(
                    f"{phase} round {rnd}: server-side DP stops the run before it overspends "
                    f"(privacy.server_budget={self.cfg.privacy.server_budget:g}): {e}"
                ) from None
            if private:
                metrics[SERVER_EPSILON] = self.accountant.get_privacy_spent().epsilon
            self._record(phase, rnd, "train", outcome, metrics, _bytes(arrays))
            self.results.info["site data"] = self._data_counts()
            self._note_refused()  # (a site that joined late may have been refused since)
            evaluated: dict[str, Any] = {}
            if phase == P.FINETUNE and (rnd % f.eval_every == 0 or rnd == total):
                evaluated, eval_outcome = rounds.evaluate_round(
                    rounds.ServerRound(self.grid, strategy, rnd, arrays, instructions, f, self.declared)
                )
                if eval_outcome.replies:
                    self._record(phase, rnd, "evaluate", eval_outcome, evaluated, 0)
                else:
                    self.results.info["evaluation"] = NO_TEST_CASES
            progress_log.info(
                "%s", round_line(phase, rnd, total, outcome, metrics, evaluated, time.monotonic() - round_started)
            )
            self.rounds_this_process += 1
            self._save(Progress(phase, rnd), arrays, strategy)
            self.results.write()
        return arrays

    def _board_round(
        self, phase: str, rnd: int, kind: str, outcome: rounds.RoundOutcome, aggregated: dict[str, Any]
    ) -> None:
        """The round in the run's TensorBoard: the aggregates, the sites' outcomes, and each site's reported
        numbers (what rounds.json holds: aggregates only, never a picture)."""
        if self.board is None:
            self.board = Board(self.run_dir / BOARD_DIR)
        statuses = Counter(r.status for r in outcome.replies)
        counts = {f"sites_{status}": statuses.get(status, 0) for status in (P.OK, P.ERROR, P.MISSING, P.REJECTED)}
        self.board.scalars(f"{phase}/{kind}", {**aggregated, **counts, "seconds": outcome.seconds}, rnd)
        for r in outcome.replies:
            if r.status == P.OK:
                bytes_up = {"bytes_up": _bytes(r.message.content[P.ARRAYS])} if kind == "train" and r.message else {}
                self.board.scalars(f"{phase}/{kind}/{r.site}", {**r.metrics, **bytes_up}, rnd)

    def _data_counts(self) -> str:
        """What the sites declared, summed (counts only: no site's cases are named)."""
        counts = list(self.declared.counts.values())
        train, labelled, test = (
            sum(c[k] for c in counts) for k in (P.DECLARED_TRAIN, P.DECLARED_LABELLED, P.DECLARED_TEST)
        )
        return (
            f"{len(counts)} sites: {train} training images (pretraining uses all), {labelled} labelled cases "
            f"fine-tuned on, {test} test cases"
        )

    # -- the plan ------------------------------------------------------------------------
    def decide_plan(self) -> PlanConfig:
        """The run's plan, from the sites' fingerprints (or a resumed run's, or the run config's when it is
        decided); written into the run's config.yaml and summary. Sites whose data do not fit are refused.

        Raises:
            FederationError: fewer than ``federation.min_sites`` sites fit the plan.
        """
        f = self.fed
        nodes = rounds.wait_for_sites(self.grid, f.min_sites, f.connect_timeout)
        self.declared.ask_fingerprints(self.grid, nodes)
        base = read_plan_text(self.saved_plan, "the checkpoint") if self.saved_plan else self.cfg.plan
        if not self.declared.fingerprints and not base.decided:
            return base  # no site could answer: the first round reports why (sites' problems)
        plan = self.declared.decide(base, self.cfg.model.img_size, self.cfg.input_step)
        refused = self._note_refused()
        self.results.info["plan"] = describe(plan)
        fit = len(self.declared.fingerprints) - len(refused)
        if refused and fit < f.min_sites:
            raise rounds.FederationError(
                f"only {fit} of {len(self.declared.fingerprints)} sites fit the run's plan ({describe(plan)}), "
                f"federation.min_sites={f.min_sites}: " + "; ".join(f"{s} {why}" for s, why in refused.items())
            )
        save_config(planned_config(self.cfg, plan), self.run_dir / "config.yaml")
        return plan

    def _note_refused(self) -> dict[str, str]:
        """The sites refused for not fitting the plan, and why (also into the summary)."""
        refused = {self.declared.site(n): why for n, why in sorted(self.declared.refused.items())}
        if refused:
            self.results.info["refused sites"] = "; ".join(f"{site}: {why}" for site, why in refused.items())
        return refused

    # -- initial weights -----------------------------------------------------------------
    def initial_encoder(self) -> ArrayRecord:
        return ArrayRecord(initial_shared_state(self.planned_config()))

    def pretrained_encoder(self) -> ArrayRecord:
        """The encoder of the pretraining checkpoint ``federation.init_encoder``, keys under ``encoder.``, and with
        ``train.init_decoder`` its U-Net decoder (under ``decoder.unet.``).

        Raises:
            CheckpointError: not a pretraining checkpoint, one for another model configuration, or one without
                the decoder asked for (the message names the file).
        """
        path, cfg = self.fed.init_encoder, self.planned_config()
        shared, meta = load_pretrained_shared(path, cfg.model, decoder=cfg.train.init_decoder)
        log.info(
            "fine-tuning from the pretrained %s in %s (%s, %s epochs)",
            "encoder and decoder" if cfg.train.init_decoder else "encoder",
            path,
            meta.get("method"),
            meta.get("epoch"),
        )
        return ArrayRecord(shared)

    def initial_segmentation(self, encoder_arrays: ArrayRecord | None) -> ArrayRecord:
        """The first global segmentation network (:func:`~amlp_core.engine.weights.initial_segmentation_state`)."""
        shared = None if encoder_arrays is None else encoder_arrays.to_torch_state_dict()
        where = self.fed.init_encoder or "the aggregated encoder"
        return ArrayRecord(initial_segmentation_state(self.planned_config(), shared, where))

    def save_encoder(self, arrays: ArrayRecord) -> Path:
        """The aggregated encoder after pretraining, as a pretraining checkpoint folder (``RUN_DIR/encoder``)
        that ``fedamlp finetune --init`` and ``federation.init_encoder`` accept."""
        folder = self.run_dir / ENCODER_DIR
        f = self.fed  # epoch: passes over each site's data
        export_encoder(
            folder,
            self.planned_config(),
            arrays.to_torch_state_dict(),
            f.pretrain_rounds * f.local_epochs,
            federated=True,
            pretrain_rounds=f.pretrain_rounds,
            local_epochs=f.local_epochs,
        )
        progress_log.info("pretrained encoder: %s", folder)
        return folder

    def pretraining_label(self) -> str:
        """What made the encoder that fine-tuning starts from, for the run's summary."""
        if not has_encoder(self.cfg.model):
            return "none (plain U-Net, no encoder)"
        if self.fed.init_encoder:
            return "initial encoder given (federation.init_encoder)"
        return self.cfg.method.name if self.fed.pretrain_rounds else "none (encoder from scratch)"

    # -- the run -------------------------------------------------------------------------
    def run(self) -> Path | None:
        """Both phases; returns the final model folder, or None when stopped early (resumable)."""
        cfg, f = self.cfg, self.fed
        resumed = self._load() if f.resume else None  # refuses before anything is written
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / FAILED).unlink(missing_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        self.started = True
        progress, arrays, strategy_saved = resumed or (Progress(), None, None)
        self.results.info = {
            "pretraining": self.pretraining_label(),
            "strategy": f.strategy,
            "sites (min)": f.min_sites,
            "pretrain rounds": f.pretrain_rounds,
            "finetune rounds": f.finetune_rounds,
            "local epochs": f.local_epochs,
            "label fraction": f"per site {f.site_label_fractions}"
            if f.site_label_fractions
            else cfg.train.label_fraction,
            "finetune local steps": f.finetune_local_steps or "local epochs, all labelled cases",
            **({"initial encoder": f.init_encoder} if f.init_encoder else {}),
            **privacy_info(cfg),
        }
        self.plan = self.decide_plan()  # (into the summary)
        atomic_write_text(self.run_dir / PLAN_FILE, plan_text(self.plan) + "\n")  # the decided plan, on its own
        started = time.monotonic()
        try:
            if progress.phase == P.PRETRAIN:
                if f.init_encoder:  # no pretraining phase (the config requires pretrain_rounds=0)
                    arrays = self.pretrained_encoder()
                elif not has_encoder(cfg.model):  # a plain U-Net: no encoder, no pretraining (the config checks)
                    arrays = None
                else:
                    arrays = arrays or self.initial_encoder()
                    if f.pretrain_rounds:
                        arrays = self._phase(P.PRETRAIN, arrays, progress.done + 1, f.pretrain_rounds, strategy_saved)
                        self.save_encoder(arrays)  # a resumed run that had finished pretraining writes it again
                arrays, progress, strategy_saved = self.initial_segmentation(arrays), Progress(P.FINETUNE), None
            arrays = self._phase(P.FINETUNE, arrays, progress.done + 1, f.finetune_rounds, strategy_saved)
        except StopRequested:
            log.info(
                "stopped after %d rounds (federation.stop_after_rounds); resume with federation.resume=true",
                self.rounds_this_process,
            )
            return None
        self.results.info["server seconds"] = round(time.monotonic() - started, 1)
        self.results.write()
        model = self.save_model(arrays)
        try:  # (the report is for people: a failure to draw it is said, and the run stands)
            write_report(self.run_dir)
        except Exception as e:  # noqa: BLE001 - matplotlib may fail in many ways
            log.warning("the run report could not be written (%s: %s)", type(e).__name__, e)
        return model

    def planned_config(self) -> Config:
        """The run config on the decided plan (its input size as ``model.img_size``): what the networks are
        built from, what the sites check, and what the saved models carry, so that predict applies it."""
        return planned_config(self.cfg, self.plan)

    def save_model(self, arrays: ArrayRecord) -> Path:
        """The final segmentation model, loadable by ``fedamlp predict --model RUN_DIR/model``."""
        folder = self.run_dir / MODEL_DIR
        f = self.fed
        if f.init_encoder:
            init_method, init_from = pretraining_method(f.init_encoder), str(f.init_encoder)
        elif f.pretrain_rounds:
            init_method, init_from = self.cfg.method.name, "federated pretraining"
        else:
            init_method, init_from = "scratch", ""
        last = max((r["round"] for r in self.results.rows if r["phase"] == P.FINETUNE), default=0)
        labelled = sum(
            int(r.get(P.NUM_EXAMPLES, 0))
            for r in self.results.rows
            if r["phase"] == P.FINETUNE
            and r["round"] == last
            and r["kind"] == "train"
            and r["site"] != P.ALL_SITES
            and r["status"] == P.OK
        )
        meta = {
            **segmentation_meta(self.planned_config(), self.class_names, init_method, init_from, labelled),
            "epoch": f.finetune_rounds,
        }
        export_segmentation(folder, self.planned_config(), arrays.to_torch_state_dict(), meta)
        progress_log.info("final model: %s", folder)
        return folder
