import pytest
import yaml

from amlp_core.config import Config, build_config, load_config
from amlp_core.errors import ConfigError


def test_defaults_are_valid_and_round_trip():
    cfg = Config()
    assert build_config(cfg.to_dict()) == cfg
    assert cfg.model.grid_size == (6, 8, 6) and cfg.model.num_patches == 288


def test_flat_and_nested_keys_agree():
    a = build_config({"method.name": "mae", "train.epochs": "3"})
    b = build_config({"method": {"name": "mae"}, "train": {"epochs": 3}})
    assert a == b and a.train.epochs == 3


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"train.epochz": 3}, "train.epochz"),
        ({"bogus.x": 1}, "bogus.x"),
        ({"method.name": "nope"}, "method.name='nope'"),
        ({"train.epochs": "many"}, "train.epochs='many'"),
        ({"model.img_size": [50, 64, 48]}, "model.img_size"),
        ({"model.embed_dim": 100}, "model.embed_dim=100"),
        ({"method.amr_start": 0.9, "method.amr_end": 0.5}, "method.amr_start=0.9"),
        ({"train.label_fraction": 0}, "train.label_fraction=0"),
        ({"data.as_slices": True}, "data.as_slices"),
        # Numbers that once trained or crashed: every float finite, an int from inf a clear error.
        ({"train.finetune_lr": float("inf")}, "train.finetune_lr=inf: must be a finite number"),
        ({"train.lr": "nan"}, "train.lr='nan': must be a finite number"),
        ({"privacy.budget": "-inf"}, "privacy.budget='-inf'"),
        ({"train.epochs": float("inf")}, "train.epochs=inf: expected a finite int"),
        ({"train.epochs": True}, "train.epochs=True: expected a number"),
    ],
)
def test_bad_values_name_the_key(raw, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        build_config(raw)


def test_tuple_from_string_and_bool_from_string():
    cfg = build_config({"model.img_size": "32x32x32", "data.synthetic_size": "32,32,32", "train.amp": "false"})
    assert cfg.model.img_size == (32, 32, 32) and cfg.train.amp is False


def test_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": {"name": "mps_ams"}, "train": {"epochs": 2}}))
    cfg = load_config(path, {"train.epochs": 5})
    assert cfg.method.name == "mps_ams" and cfg.train.epochs == 5
    path.write_text("- a list")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


def test_digest_changes_with_the_section():
    a, b = Config(), build_config({"method.ccl_weight": 0.2})
    assert a.digest("model") == b.digest("model")
    assert a.digest() != b.digest()


def test_init_encoder_needs_no_pretraining_rounds():
    with pytest.raises(ConfigError, match=r"federation\.pretrain_rounds=2.*federation\.init_encoder='runs/x/encoder'"):
        build_config({"federation.init_encoder": "runs/x/encoder", "federation.pretrain_rounds": 2})
    cfg = build_config({"federation.init_encoder": "runs/x/encoder", "federation.pretrain_rounds": 0})
    assert cfg.federation.init_encoder == "runs/x/encoder"
    assert cfg.run_digest() != build_config({"federation.pretrain_rounds": 0}).run_digest()


def test_seg_arch_is_checked_and_a_plain_unet_refuses_an_encoder():
    with pytest.raises(ConfigError, match=r"model\.seg_arch='resnet'.*vit, unet"):
        build_config({"model.seg_arch": "resnet"})
    single_site = build_config({"model.seg_arch": "unet"})  # the federation's plan does not concern one site
    with pytest.raises(ConfigError, match=r"federation\.pretrain_rounds=2.*seg_arch=unet.*no encoder to pretrain"):
        single_site.check_federation()  # but a federation with the default plan would pretrain
    with pytest.raises(ConfigError, match=r"federation\.init_encoder='runs/x/encoder'.*seg_arch=unet"):
        build_config(
            {"model.seg_arch": "unet", "federation.pretrain_rounds": 0, "federation.init_encoder": "runs/x/encoder"}
        )
    with pytest.raises(ConfigError, match=r"model\.img_size=\(36, 36, 36\).*multiple of 8"):
        build_config(
            {
                "model.seg_arch": "unet",
                "federation.pretrain_rounds": 0,
                "model.img_size": "36,36,36",
                "model.patch_size": 4,
                "model.conv_channels": "8,16",
            }
        )
    unet = build_config({"model.seg_arch": "unet", "federation.pretrain_rounds": 0})
    vit = build_config({"federation.pretrain_rounds": 0})
    assert Config().model.seg_arch == "vit" and unet.model.seg_arch == "unet"
    assert build_config(unet.to_dict()) == unet
    assert unet.run_digest() != vit.run_digest() and unet.digest("model") != vit.digest("model")
