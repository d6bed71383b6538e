"""fedamlp: federated self-supervised pretraining and segmentation fine-tuning, on the command line.

Every command turns its arguments into one flat set of config overrides, builds the
:class:`~amlp_core.config.Config` once and calls the engine (:mod:`amlp_core.engine.pipeline` for the
jobs, :mod:`amlp_core.engine.inference` to evaluate and predict, :mod:`simulations.simulate` to federate).
Expected failures (bad data, bad values, bad checkpoints) end with one line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from amlp_core.atomic import atomic_write_text, check_output
from amlp_core.config import (
    DATA_FORMATS,
    METHOD_NAMES,
    STRATEGIES,
    Config,
    DataConfig,
    build_config,
    check_keys,
    load_config,
)
from amlp_core.engine.lesions import EMPTY_CASES, EMPTY_HITS, EMPTY_SHARE, LESION_CASES, LESION_DICE
from amlp_core.errors import AMLPError, ConfigError, DataError
from amlp_core.logs import setup_logging
from amlp_core.runfolder import check_new_run, hold

if TYPE_CHECKING:
    from amlp_core.engine.split import DataSplit

log = logging.getLogger("fedamlp")


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"fedamlp: error: --set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _config(args: argparse.Namespace, data_path: str, extra: dict[str, Any]) -> Config:
    """The schema's defaults < the data-derived settings (or, with ``--config``, that file instead) < explicit
    flags < ``--set``."""
    from amlp_core.engine.split import data_defaults

    overrides: dict[str, Any] = {}
    sets = _parse_set(args.set)
    if not getattr(args, "config", None):  # (the user's class count serves data that name none)
        overrides.update(data_defaults(data_path, args.format, args.dims, num_classes=sets.get("model.num_classes")))
    overrides["data.path"] = data_path
    overrides["data.format"] = args.format
    for flag, key in (
        ("epochs", "train.epochs"),
        ("batch_size", "train.batch_size"),
        ("seed", "train.seed"),
        ("device", "train.device"),
        ("max_minutes", "train.max_minutes"),
    ):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    overrides.update(extra)
    overrides.update(sets)
    if getattr(args, "config", None):
        return load_config(args.config, overrides)
    return build_config(overrides)


def _add_common(p: argparse.ArgumentParser, data_required: bool = True) -> None:
    p.add_argument("--data", required=data_required, help="dataset folder, or 'synthetic' for built-in phantoms")
    p.add_argument("--format", default="auto", choices=DATA_FORMATS, help="dataset layout")
    p.add_argument("--dims", type=int, choices=[2, 3], help="2D or 3D model (default: the data's)")
    p.add_argument(
        "--config", help="YAML config file: sections and keys of amlp_core/config.py, e.g. {train: {epochs: 5}}"
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-minutes", type=float, help="stop training after this wall time")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config value, e.g. --set method.ccl_weight=0.2 (repeatable)",
    )


def _print_dice(result: dict[str, Any], class_names: dict[str, str] | None = None) -> None:
    if "dice_mean" not in result:
        print("no test cases: the final evaluation was skipped (set data.test_fraction above 0 to have one)")
        return
    class_names = class_names or {}
    print(f"{'class':<24}{'Dice':>8}")
    for key, value in result.items():
        if key.startswith("dice_") and key != "dice_mean":
            k = key.removeprefix("dice_")
            print(f"{class_names.get(k, 'class ' + k):<24}{value:>8.4f}")
    print(f"{'mean':<24}{result['dice_mean']:>8.4f}")
    print(f"({result['num_examples']} test cases)")
    if result.get(EMPTY_CASES):
        print(f"lesion Dice {result[LESION_DICE]:.4f} over the {result[LESION_CASES]} test images that hold a lesion;")
        print(
            f"{result[EMPTY_HITS]} of the {result[EMPTY_CASES]} lesion-free test images predicted empty "
            f"({result[EMPTY_SHARE]:.1%})"
        )


@contextmanager
def _run_folder(
    out: str | Path, cfg: Config, resume: bool = False, overwrite: bool = False, phase: str = "pretrain"
) -> Iterator[DataSplit]:
    """Hold the run folder ``out`` for a single-site run and yield its data, read and checked.

    A folder that holds a run is refused unless resumed (a stopped ``phase`` of ``cfg``) or
    overwritten; the pipeline removes an overwritten run only once every check of the start has
    passed (data, checkpoint, privacy budget), so a refused start changes nothing there.
    """
    from amlp_core.engine.pipeline import check_resume
    from amlp_core.engine.split import load_split

    check_new_run(out, resume, overwrite)
    with hold(out):
        if resume:
            check_resume(out, cfg, phase)
        yield load_split(cfg)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from amlp_core.engine.pipeline import pretrain

    cfg = _config(args, args.data, {"method.name": args.method})
    with _run_folder(args.out, cfg, args.resume, args.overwrite) as split:
        metrics = pretrain(cfg, args.out, split, overwrite=args.overwrite)
    private = f", DP epsilon {metrics['epsilon']:.3f} at delta {cfg.privacy.delta:g}" if "epsilon" in metrics else ""
    print(
        f"pretrained {cfg.method.name} for {metrics['epoch']} epochs: loss {metrics['loss']:.4f}{private} -> {args.out}"
    )
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from amlp_core.engine.artefacts import model_config_of
    from amlp_core.engine.pipeline import finetune

    extra: dict[str, Any] = {"train.label_fraction": args.label_fraction}
    if args.init:
        model = model_config_of(args.init)  # the encoder's architecture comes from the pretraining run
        extra.update(
            {f"model.{k}": v for k, v in dataclasses.asdict(model).items() if k != "seg_arch"}
        )  # not the encoder's: model.seg_arch=unet with --init is refused
    cfg = _config(args, args.data, extra)
    with _run_folder(args.out, cfg, args.resume, args.overwrite, phase="finetune") as split:
        result = finetune(cfg, args.out, init=args.init, split=split, overwrite=args.overwrite)
    from amlp_core.engine.artefacts import load_segmentation

    _print_dice(result, load_segmentation(args.out)[1].get("class_names"))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from amlp_core.engine.inference import evaluate

    overrides = {"path": args.data, "format": args.format} if args.data else None
    owned = (args.model, args.data or _trained_on(args.model))  # the model folder and the data are never written
    out = check_output(args.json, "--json", keep_out_of=owned) if args.json else Path(args.model) / "evaluation.json"
    post: dict[str, Any] = {} if args.keep_largest is None else {"post_keep_largest": args.keep_largest == "true"}
    if args.min_share is not None:
        post["post_min_share"] = args.min_share
    if args.min_confidence is not None:
        post["post_min_confidence"] = args.min_confidence
    if args.tta is not None:
        post["tta_flips"] = args.tta == "true"
    result = evaluate(
        args.model,
        overrides,
        device=args.device,
        all_cases=args.all_cases,
        post=post,
        allow_unfinished=args.allow_unfinished,
    )
    _print_dice(result, result.get("class_names"))
    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


def _trained_on(model: str) -> str:
    """The dataset folder a model folder's ``config.yaml`` names ("" when it names none or cannot be read:
    the evaluation then fails on the model itself, with its own message)."""
    from amlp_core.reading import read_text

    try:
        path = yaml.safe_load(read_text(Path(model) / "config.yaml", "model config", limit=2**20))["data"]["path"]
    except (AMLPError, ValueError, KeyError, TypeError, RecursionError, yaml.YAMLError):
        return ""
    return str(path) if isinstance(path, str) and path != "synthetic" else ""


def cmd_predict(args: argparse.Namespace) -> int:
    from amlp_core.engine.inference import predict_file, predict_folder, scans_in

    if Path(args.input).is_dir() and scans_in(args.input):  # a folder of scans (not one DICOM series)
        sizes = predict_folder(args.model, args.input, args.output, args.device, args.allow_unfinished)
        print(f"wrote the segmentations, quick-looks and {sizes.name} (each class's size) to {sizes.parent}")
        return 0
    out = predict_file(args.model, args.input, args.output, device=args.device, allow_unfinished=args.allow_unfinished)
    print(f"wrote {out}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from amlp_core.data import check_dataset

    if args.json:
        check_output(args.json, "--json", keep_out_of=(args.path,))
    for flag, value in (("--num-classes", args.num_classes), ("--max-voxels", args.max_voxels)):
        if value is not None and value < 1:
            raise ConfigError(f"invalid {flag}={value}: must be at least 1")
    if not 0.5 <= args.near_duplicates <= 1:
        raise ConfigError(f"invalid --near-duplicates={args.near_duplicates}: must be in [0.5, 1]")
    report = check_dataset(
        args.path, args.format, args.num_classes, max_voxels=args.max_voxels, near_duplicates=args.near_duplicates
    )
    print(report.render())
    if args.json:
        atomic_write_text(args.json, json.dumps(report.to_dict(), indent=2))
    if not report.ok:
        first = report.errors[0]
        raise DataError(
            f"{first.file}: {first.message} (dataset {args.path}: {len(report.errors)} errors, listed above)"
        )
    return 0


def cmd_data_fingerprint(args: argparse.Namespace) -> int:
    """Exactly what this dataset would tell a federation's server: its fingerprint (aggregates only)."""
    from amlp_core.engine.split import read_split

    if args.out:
        check_output(args.out, "--out", (".json",), keep_out_of=(args.path,))
    args.dims, args.config = None, None
    split = read_split(_config(args, args.path, {"data.modality": args.modality}))
    assert split.fingerprint is not None
    text = json.dumps(split.fingerprint.to_record(), indent=1)
    if args.out:
        atomic_write_text(args.out, text + "\n")
        logging.getLogger(__name__).info("wrote %s: what leaves the site at a run's first query", args.out)
    print(text)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """What a federation's server decides from these sites' fingerprints, and which site fits it."""
    from amlp_core.data.plan import Fingerprint, PlanError, decide_plan, describe, fit_problem, plan_text, planned_dims
    from amlp_core.presets import ROI
    from amlp_core.reading import read_text

    sets = _parse_set(args.set)
    fingerprints = {}
    for path in args.fingerprints:
        try:
            record = json.loads(read_text(path, "fingerprint"))
        except ValueError as e:
            raise PlanError(f"{path}: not a fingerprint (fedamlp data fingerprint writes one): {e}") from None
        if not isinstance(record, dict):
            raise PlanError(f"{path}: not a fingerprint (fedamlp data fingerprint writes one)")
        fingerprints[path] = Fingerprint.from_record(record, path)
    # The network's input budget of the dimension most deciding cases have (a run's data defaults), unless --set.
    dims = planned_dims(fingerprints, sets.get("plan.modality", ""))
    size = ROI["volume" if dims == 3 else "image"]
    cfg = build_config({"model.spatial_dims": dims, "model.img_size": size, "data.synthetic_size": size, **sets})
    plan = decide_plan(fingerprints, cfg.plan, cfg.model.img_size, cfg.input_step)
    print(f"plan: {describe(plan)}")
    for path, fp in fingerprints.items():
        problem = fit_problem(fp, plan)
        print(
            f"  {path}: {'refused: ' + problem.reason if problem else 'fits'} ({fp.cases} cases, {fp.labelled} labelled)"
        )
    print(plan_text(plan))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Pretrain AMLP on synthetic phantoms, fine-tune with 25 % of the labels, print Dice."""
    from amlp_core.engine.pipeline import finetune, pretrain

    out = Path(args.out)
    base = build_config({**_demo_defaults(), "train.seed": args.seed, "train.device": args.device})
    pre_cfg = base.replace(train={"epochs": args.pretrain_epochs})
    cfg = base.replace(train={"epochs": args.finetune_epochs, "label_fraction": 0.25})
    check_new_run(out / "finetune", False, args.overwrite)  # before the first half is redone
    with _run_folder(out / "pretrain", pre_cfg, overwrite=args.overwrite) as split:
        pretrain(pre_cfg, out / "pretrain", split, overwrite=args.overwrite)
    with _run_folder(out / "finetune", cfg, overwrite=args.overwrite) as split:
        result = finetune(cfg, out / "finetune", init=out / "pretrain", split=split, overwrite=args.overwrite)
    _print_dice(result, {"1": "lesion"})
    print(f"model: {out / 'finetune'}  (use: fedamlp predict --model {out / 'finetune'} --input X --output Y)")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """The whole two-phase federation on this machine (Flower's simulation engine)."""
    from server.results import RunResults
    from simulations.simulate import check_data, simulate

    cfg = simulate_config(args)
    check_data(cfg)
    run_dir = simulate(cfg, timeout=args.timeout, overwrite=args.overwrite, console=_console(args))
    print(RunResults.read(run_dir).console_summary())
    print(f"model: {run_dir / 'model'}  (fedamlp predict --model {run_dir / 'model'} --input X --output Y)")
    report = run_dir / "report" / "report.html"
    if report.is_file():
        print(f"report: {report}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """The live status page of a federated run, served until interrupted."""
    from server.status import status_server

    server = status_server(args.run_dir, args.port, args.host)
    print(f"status of {args.run_dir}: http://{args.host}:{server.server_address[1]}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """The run report of a federated run folder: HTML (self-contained) and Markdown with its figures."""
    if (args.run_dir is None) == (args.site is None):
        raise ConfigError("fedamlp report takes a run folder, or --site and a site's state folder (one of the two)")
    if args.site:
        from client.report import write_site_report

        out = write_site_report(args.site)
    else:
        from server.report import write_report

        out = write_report(args.run_dir)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def simulate_config(args: argparse.Namespace) -> Config:
    """``fedamlp simulate``'s settings. Precedence: the app's embedded default run (pyproject.toml, the
    schema's defaults with :data:`~amlp_core.presets.EMBEDDED_RUN`) < ``--config FILE`` < data-derived
    settings < flags < ``--set``."""
    from amlp_core.engine.split import data_defaults
    from simulations.simulate import default_run_config

    overrides: dict[str, Any] = {}
    if args.data or args.dims:
        overrides.update(data_defaults(args.data or "synthetic", args.format, args.dims))
    for flag, key in (
        ("sites", "federation.sites"),
        ("method", "method.name"),
        ("pretrain_rounds", "federation.pretrain_rounds"),
        ("finetune_rounds", "federation.finetune_rounds"),
        ("local_epochs", "federation.local_epochs"),
        ("strategy", "federation.strategy"),
        ("label_fraction", "train.label_fraction"),
        ("out", "federation.run_dir"),
        ("seed", "train.seed"),
        ("device", "train.device"),
        ("inject", "federation.inject"),
    ):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    if args.resume:
        overrides["federation.resume"] = True
    overrides.update(_parse_set(args.set))
    embedded = build_config(default_run_config())
    if args.config:
        return load_config(args.config, overrides, base=embedded)
    return build_config(overrides, base=embedded)


def _demo_defaults() -> dict[str, Any]:
    from amlp_core.engine.split import data_defaults

    return {
        **data_defaults("synthetic", dims=3),
        "data.synthetic_cases": 40,
        "method.name": "amlp",
        "train.batch_size": 8,
        "model.depth": 4,
    }


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (refused otherwise)")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one ``fedamlp: error:`` line (exit 2) like every other error, and the
    console flags on every sub-command."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _SubParsers)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"fedamlp: error: {error_line(message)} (see {self.prog} --help)\n")


def error_line(text: object, limit: int = 1000) -> str:
    """``text`` as one line of at most ``limit`` characters: line breaks and other control characters (a
    newline in a file name) shown escaped, the rest of an enormous message (a YAML alias bomb) cut."""
    line = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))
    return line if len(line) <= limit else f"{line[:limit]}... ({len(line) - limit:,} more characters)"


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def _console(args: argparse.Namespace) -> str:
    """``quiet``, ``normal`` or ``verbose``: how much the command says (``-q`` / ``-v``, before or after it)."""
    if getattr(args, "verbose", False):
        return "verbose"
    return "quiet" if getattr(args, "quiet", False) else "normal"


def _console_flags() -> argparse.ArgumentParser:
    """``-q/--quiet`` and ``-v/--verbose``, taken before the command and after it (``fedamlp -q simulate``
    and ``fedamlp simulate -q``); SUPPRESS keeps a sub-command from resetting what was given before it."""
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings and errors only")
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug logging; a simulation shows every site's lines and Flower's",
    )
    return flags


class _SubParsers(argparse._SubParsersAction):
    """Every sub-command (and sub-sub-command) takes the console flags."""

    def add_parser(self, name, **kwargs):  # type: ignore[no-untyped-def]
        kwargs.setdefault("parents", []).append(_console_flags())
        return super().add_parser(name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedamlp", description=__doc__.splitlines()[0], parents=[_console_flags()])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="self-supervised pretraining at one site")
    _add_common(p)
    p.add_argument("--method", default="amlp", choices=METHOD_NAMES)
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--resume", action="store_true", help="go on with the stopped pretraining in --out")
    _add_overwrite(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="segmentation fine-tuning (from a pretraining run or from scratch)")
    _add_common(p)
    p.add_argument("--init", help="pretraining run folder (omit to train from scratch)")
    p.add_argument("--label-fraction", type=float, default=1.0, help="share of labelled cases to use")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="go on with the stopped fine-tuning in --out")
    _add_overwrite(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="Dice per class of a fine-tuned model on the test split")
    p.add_argument("--model", required=True, help="fine-tuning run folder")
    p.add_argument("--data", help="dataset (default: the one the model was trained on)")
    p.add_argument("--format", default="auto", choices=DATA_FORMATS)
    p.add_argument("--all-cases", action="store_true", help="evaluate every case, not only the test split")
    p.add_argument("--json", help="where to write the result (default: MODEL/evaluation.json)")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--keep-largest",
        choices=("true", "false"),
        help="true|false: keep only each class's largest component (default: the model's model.post_keep_largest)",
    )
    p.add_argument("--min-share", type=float, help="drop components under this share (default: model.post_min_share)")
    p.add_argument(
        "--min-confidence",
        type=float,
        help="drop components whose mean class probability is under this (default: model.post_min_confidence)",
    )
    p.add_argument(
        "--tta", choices=("true", "false"), help="average the mirrored predictions (default: model.tta_flips)"
    )
    p.add_argument(
        "--allow-unfinished",
        action="store_true",
        help="use a model whose fine-tuning stopped before its last step (refused otherwise)",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="segment one scan (NIfTI in, NIfTI out)")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, help="a NIfTI or PNG scan, a DICOM series folder, or a folder of scans")
    p.add_argument("--output", required=True, help="the segmentation file (a folder for a folder of scans)")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--allow-unfinished",
        action="store_true",
        help="use a model whose fine-tuning stopped before its last step (refused otherwise)",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    c = data_sub.add_parser("check", help="validate a dataset and report every problem")
    c.add_argument("path")
    c.add_argument("--format", default="auto", choices=DATA_FORMATS)
    c.add_argument("--num-classes", type=int, help="declared classes (when the dataset does not say)")
    c.add_argument(
        "--max-voxels",
        type=int,
        default=DataConfig().max_voxels,
        help="refuse a file whose header declares more values (data.max_voxels)",
    )
    c.add_argument(
        "--near-duplicates",
        type=float,
        default=DataConfig().near_duplicates,
        help="2D images whose thumbnails correlate above this are near-duplicates (data.near_duplicates; 1: off)",
    )
    c.add_argument("--json", help="also write the report as JSON")
    c.set_defaults(func=cmd_data_check)
    c = data_sub.add_parser(
        "fingerprint", help="what this dataset would tell a federation's server (aggregates only), as JSON"
    )
    c.add_argument("path")
    c.add_argument("--format", default="auto", choices=DATA_FORMATS)
    c.add_argument("--modality", default="auto", help="the scans' modality (default: the dataset's own)")
    c.add_argument("--out", help="also write it to this JSON file (for fedamlp plan)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a data.* setting")
    c.set_defaults(func=cmd_data_fingerprint)

    p = sub.add_parser("plan", help="the plan a server decides from sites' fingerprints, and which site fits it")
    p.add_argument("fingerprints", nargs="+", help="fingerprint JSON files (fedamlp data fingerprint --out)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a plan.* or model.img_size value to keep"
    )
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("simulate", help="the two-phase federation on this machine (Flower simulation)")
    p.add_argument("--data", help="dataset folder, or 'synthetic' (the default: built-in phantoms, one style per site)")
    p.add_argument("--format", default="auto", choices=DATA_FORMATS)
    p.add_argument("--dims", type=int, choices=[2, 3])
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--sites", type=int)
    p.add_argument("--method", choices=METHOD_NAMES)
    p.add_argument("--pretrain-rounds", type=int)
    p.add_argument("--finetune-rounds", type=int)
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--strategy", choices=STRATEGIES)
    p.add_argument("--label-fraction", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--out", help="run folder (default: runs/simulation)")
    p.add_argument("--resume", action="store_true", help="continue a stopped run from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--timeout", type=_positive_seconds, help="give up after this many seconds")
    p.add_argument(
        "--inject", metavar="SPEC", help="faults of simulated sites, e.g. site1:crash@finetune:2 (docs/federation.md)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("status", help="a live status page of a federated run, on loopback")
    p.add_argument("run_dir", help="the run folder (federation.run_dir)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--host", default="127.0.0.1", help="the address to serve on (loopback unless told otherwise)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "report", help="the run report of a federated run, or a site's own (--site): HTML and Markdown with figures"
    )
    p.add_argument("run_dir", nargs="?", help="the run folder (federation.run_dir, e.g. runs/simulation)")
    p.add_argument("--site", metavar="STATE_DIR", help="a site's own report, with its pictures, from its state folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="pretrain + fine-tune on synthetic phantoms (the quick first try)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--pretrain-epochs", type=int, default=8)
    p.add_argument("--finetune-epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    _add_overwrite(p)
    p.set_defaults(func=cmd_demo)
    return parser


#: Flags that name something to read: checked before the heavy imports, so a wrong path fails at once.
INPUT_FLAGS = ("data", "init", "model", "input", "path", "fingerprints")  # (fingerprints: a list)


def _missing_input(args: argparse.Namespace) -> str | None:
    """The first input flag whose file or folder does not exist, as an error line; None when all exist."""
    for flag in INPUT_FLAGS:
        given = getattr(args, flag, None)
        for value in given if isinstance(given, list) else [given]:
            if value and value != "synthetic" and not Path(value).exists():
                name = {"path": "PATH", "fingerprints": "FINGERPRINT"}.get(flag, f"--{flag}")
                return f"{name} {value}: no such file or folder"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = _missing_input(args)
    if missing:
        print(f"fedamlp: error: {error_line(missing)}", file=sys.stderr)
        return 2
    setup_logging({"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}[_console(args)])
    try:
        check_keys(_parse_set(getattr(args, "set", None) or []))  # a mistyped key fails before the heavy imports
        return args.func(args)
    except AMLPError as e:
        print(f"fedamlp: error: {error_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # the system refused a file: a name too long, a full disk, no permission
        where = f"{e.filename}: " if e.filename else ""
        print(f"fedamlp: error: {error_line(where + (e.strerror or str(e)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedamlp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
