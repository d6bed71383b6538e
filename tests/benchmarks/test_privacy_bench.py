"""The privacy-utility benchmark on a tiny real run: its rows, the composed epsilon of private pretraining
and fine-tuning, the pairing with scratch, resumption."""

import json

import pytest

from amlp_core.privacy import epsilon_of
from simulations.benchmarks import privacy
from tests.benchmarks.test_pretrain_gain import TINY


def _args(tmp_path):
    sets = [a for s in TINY for a in ("--set", s)]
    return [
        *("--data", "synthetic", "--out", str(tmp_path / "privacy.json"), "--runs", str(tmp_path / "runs")),
        *("--budgets", "none,8", "--seeds", "0", "--seeds-at", "8=0,1", "--inits", "scratch,amlp,amlp_private"),
        *("--finetune-steps", "3", "--curve-every", "0", "--pretrain-epochs", "1", "--pretrain-share", "0.5"),
        *sets,
    ]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_privacy_benchmark_rows_compose_and_resume(tmp_path, monkeypatch):
    payload = privacy.main(_args(tmp_path))
    rows = payload["rows"]
    expected = [(i, b, s) for b, seeds in (("none", [0]), ("8", [0, 1])) for s in seeds for i in privacy.INITS]
    assert [(r["init"], r["budget"], r["seed"]) for r in rows] == expected
    assert {r["recipe"] for r in rows if r["budget"] == "none"} == {"-"}
    assert {r["recipe"] for r in rows if r["budget"] == "8"} == {"default"}
    for r in rows:
        assert 0 <= r["dice_mean"] <= 1 and r["steps"] == 3 and r["curve"]
        assert (r["epsilon"] is None) == (r["budget"] == "none")
    for r in (r for r in rows if r["budget"] == "8"):
        assert 8 * 0.9 <= r["epsilon"] <= 8.0  # the accountant's epsilon after the run, within the budget
    # The private pretraining's stretches are in the private row's ledger: the epsilon covers both phases.
    private = next(r for r in rows if r["init"] == "amlp_private" and r["budget"] == "8")
    ledger = json.loads((tmp_path / "runs" / "finetune_amlp_private_eps8_s0" / "privacy_ledger.json").read_text())
    pretraining = [h for h in ledger["history"] if h[0] != ledger["noise_multiplier"]]
    assert pretraining and 3.5 <= epsilon_of([tuple(h) for h in pretraining], 1e-5) <= 4.0  # its half alone
    assert private["epsilon"] == pytest.approx(epsilon_of([tuple(h) for h in ledger["history"]], 1e-5))
    cell = next(c for c in payload["summary"] if c["init"] == "amlp" and c["budget"] == "8")
    scratch = {r["seed"]: r["dice_mean"] for r in rows if r["init"] == "scratch" and r["budget"] == "8"}
    amlp = {r["seed"]: r["dice_mean"] for r in rows if r["init"] == "amlp" and r["budget"] == "8"}
    assert cell["seeds"] == 2 and cell["minus_scratch"]["mean"] == pytest.approx(
        sum(amlp[s] - scratch[s] for s in (0, 1)) / 2
    )
    assert "without DP: not covered" in (tmp_path / "privacy.md").read_text()
    monkeypatch.setattr(privacy, "finetune", lambda *a, **k: pytest.fail("a finished row was re-run"))
    assert privacy.main(_args(tmp_path))["rows"] == rows


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_private_recipes_are_rows_of_their_own_paired_within_a_recipe(tmp_path):
    args = _args(tmp_path)
    args[args.index("--inits") + 1] = "scratch,amlp"
    args[args.index("--seeds-at") + 1] = "8=0"
    recipes = ["--recipe", "default=", "--recipe", "bitfit=privacy.trainable=norms_biases;privacy.optimizer=sgd"]
    payload = privacy.main([*args, *recipes])
    rows = payload["rows"]
    # Without DP a recipe changes nothing: one row per start; under DP one per start and recipe.
    assert [(r["init"], r["recipe"], r["budget"]) for r in rows] == [
        ("scratch", "-", "none"),
        ("amlp", "-", "none"),
        ("scratch", "default", "8"),
        ("scratch", "bitfit", "8"),
        ("amlp", "default", "8"),
        ("amlp", "bitfit", "8"),
    ]
    bitfit = next(r for r in rows if r["init"] == "amlp" and r["recipe"] == "bitfit")
    saved = (tmp_path / "runs" / "finetune_amlp_eps8_s0_bitfit" / "config.yaml").read_text()
    assert "trainable: norms_biases" in saved and "optimizer: sgd" in saved
    assert bitfit["recipe_sets"] == {"privacy.trainable": "norms_biases", "privacy.optimizer": "sgd"}
    # Each row says what it trained: the default recipe resolved for its start (auto: the decoder after AMLP's
    # transformer-decoder pretraining, everything from scratch), a named one as set.
    trained = {(r["init"], r["recipe"]): r["trained"] for r in rows if r["budget"] == "8"}
    assert trained["amlp", "default"] == "decoder, sgd 0.5" and trained["scratch", "default"].startswith("all, adamw")
    assert trained["amlp", "bitfit"].startswith("norms_biases, sgd")
    assert "decoder, sgd 0.5" in (tmp_path / "privacy.md").read_text()
    cell = next(c for c in payload["summary"] if (c["init"], c["recipe"], c["budget"]) == ("amlp", "bitfit", "8"))
    scratch = next(r for r in rows if (r["init"], r["recipe"], r["budget"]) == ("scratch", "bitfit", "8"))
    assert cell["minus_scratch"]["mean"] == pytest.approx(bitfit["dice_mean"] - scratch["dice_mean"])
    plain = next(r for r in rows if (r["init"], r["budget"]) == ("amlp", "none"))
    assert cell["share_of_no_dp"] == pytest.approx(bitfit["dice_mean"] / plain["dice_mean"])
    # The budget "recipe": each recipe without DP, resolved for its start, as its private rows' reference.
    args[args.index("--budgets") + 1] = "none,recipe,8"
    again = privacy.main([*args, *recipes])
    same = {(r["init"], r["recipe"]): r for r in again["rows"] if r["budget"] == "recipe"}
    assert set(same) == {(i, n) for i in ("scratch", "amlp") for n in ("default", "bitfit")}
    assert same["amlp", "default"]["trained"] == "decoder, sgd 0.5" and same["amlp", "default"]["epsilon"] is None
    saved = (tmp_path / "runs" / "finetune_amlp_epsrecipe_s0" / "config.yaml").read_text()
    assert "site_dp: false" in saved and "trainable: decoder" in saved and "lr: 0.5" in saved
    cell = next(c for c in again["summary"] if (c["init"], c["recipe"], c["budget"]) == ("amlp", "bitfit", "8"))
    assert cell["share_of_recipe"] == pytest.approx(bitfit["dice_mean"] / same["amlp", "bitfit"]["dice_mean"])
    assert "share of the recipe without DP" in (tmp_path / "privacy.md").read_text()
    # A later invocation with other recipes keeps the earlier ones in the header, as its rows keep them.
    args[args.index("--budgets") + 1] = "none"  # rows done already: nothing trains
    later = privacy.main([*args, "--recipe", "sgd=privacy.optimizer=sgd"])
    assert set(later["recipes"]) == {"default", "bitfit", "sgd"} and len(later["rows"]) == len(again["rows"])
    with pytest.raises(SystemExit, match="a recipe may set privacy"):
        privacy.main([*args, "--recipe", "lr=train.finetune_lr=0.1"])


@pytest.mark.slow
def test_federated_rows_are_real_federations_sharing_one_pretraining(tmp_path):
    """--sites 2: each row a real simulated federation under site DP; the amlp rows pretrain once (the
    non-private row) and the private row fine-tunes from that encoder (and its SparK decoder); epsilon is the
    sites' accountants'."""
    from tests.benchmarks.test_compare import TINY as FED_TINY

    out = tmp_path / "privacy_fed.json"
    sets = [a for s in FED_TINY for a in ("--set", s)]
    argv = [
        *("--data", "synthetic", "--out", str(out), "--runs", str(tmp_path / "runs")),
        *("--sites", "2", "--budgets", "none,8", "--seeds", "0", "--inits", "amlp"),
        *("--pretrain-rounds", "1", "--finetune-rounds", "2", "--set", "federation.local_epochs=1"),
        *("--set", "model.pretrain_decoder=unet", "--set", "train.init_decoder=true"),
        *("--recipe", "nbo=privacy.trainable=norms_biases_output;privacy.optimizer=sgd;privacy.lr=0.05"),
        *sets,
    ]
    payload = privacy.main(argv)
    assert payload["sites"] == 2 and payload["finetune_rounds"] == 2
    plain, private = payload["rows"]
    assert (plain["budget"], private["budget"]) == ("none", "8")
    assert plain["epsilon"] is None and 8 * 0.5 <= private["epsilon"] <= 8.0  # a site's accountant, within budget
    assert private["trained"] == "norms_biases_output, sgd 0.05" and plain["trained"].startswith("all, adamw")
    for row in (plain, private):
        assert [p["round"] for p in row["curve"]] == [1, 2] and 0 <= row["dice_mean"] <= 1
        assert row["dice_mean"] == pytest.approx(row["curve"][-1]["test_dice_mean"])
    runs = tmp_path / "runs"
    assert (runs / "federated_amlp_encoder" / "checkpoint.pt").exists()
    config = (runs / "federated_amlp_eps8_s0_nbo" / "config.yaml").read_text()
    assert "federated_amlp_encoder" in config and "pretrain_rounds: 0" in config and "site_dp: true" in config
    # The recipe of the CPU's best private point, federated: SparK's decoder pretrained and shared, the
    # segmentation decoder started from it, only the norms, biases and output layer trained under DP.
    assert "init_decoder: true" in config and "trainable: norms_biases_output" in config
    with pytest.raises(SystemExit, match="rows of 2 site"):
        privacy.main([*argv[: argv.index("--sites")], *argv[argv.index("--sites") + 2 :]])


def test_a_share_of_a_reference_that_never_segments_is_none_not_a_crash():
    # A recipe whose non-private run ends at Dice 0 (measured: SGD at 0.2) once stopped the benchmark after a
    # private row had trained 12 minutes; its share is undefined, the row stays.
    assert privacy.share(0.125, [0.0]) is None and privacy.share(0.125, []) is None
    assert privacy.share(0.1, [0.2, 0.3]) == pytest.approx(0.4)
    rows = [
        {"init": "amlp", "recipe": "r", "recipe_sets": {}, "budget": b, "seed": 0, "dice_mean": d, "epsilon": e}
        for b, d, e in (("recipe", 0.0, None), ("8", 0.125, 7.99))
    ]
    stats, markdown = privacy.summary(rows)
    cell = next(c for c in stats if c["budget"] == "8")
    assert cell["share_of_recipe"] is None and cell["dice_mean"] == pytest.approx(0.125)
    assert "0.125" in markdown
