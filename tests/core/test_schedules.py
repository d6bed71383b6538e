import pytest

from amlp_core.schedules import amr_ratio, federated_progress, warmup_cosine


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_amr_ratio_grows_from_start_to_end(schedule):
    values = [amr_ratio(t / 10, 0.25, 0.75, schedule) for t in range(11)]
    assert values[0] == pytest.approx(0.25) and values[-1] == pytest.approx(0.75)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert amr_ratio(-1) == pytest.approx(0.25) and amr_ratio(2) == pytest.approx(0.75)


def test_amr_linear_midpoint_and_cosine_shape():
    assert amr_ratio(0.5) == pytest.approx(0.5)
    assert amr_ratio(0.25, schedule="cosine") < amr_ratio(0.25, schedule="linear")
    with pytest.raises(ValueError, match="unknown AMR schedule 'step'"):
        amr_ratio(0.5, schedule="step")


def test_federated_progress_depends_only_on_the_round_counter():
    assert federated_progress(1, 0, 2, 4) == 0.0
    assert federated_progress(2, 1, 2, 4) == pytest.approx(1.5 / 4)
    assert federated_progress(4, 2, 2, 4) == 1.0
    with pytest.raises(ValueError, match="server round 5"):
        federated_progress(5, 0, 1, 4)


def test_warmup_cosine():
    assert warmup_cosine(0.0, 0.1) < 0.01 and warmup_cosine(0.1, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(1.0, 0.1) == pytest.approx(0.01)


def test_a_federated_round_warms_the_rate_up_over_its_steps_at_a_fixed_masking_ratio():
    """Round 1 of a federated pretraining: the masking ratio is the round's, the rate follows the steps."""
    import torch

    from amlp_core.engine.loops import pretrain_epoch
    from amlp_core.methods import build_method
    from tests.conftest import tiny_config

    cfg = tiny_config(2, **{"method.name": "mps_ams"})
    torch.manual_seed(0)
    method = build_method(cfg.model, cfg.method)
    batches = [{"image": torch.randn(2, 1, *cfg.model.img_size)} for _ in range(4)]
    optimizer = torch.optim.AdamW(method.parameters(), lr=1.0)
    rates: list[float] = []

    def lr_at(p: float) -> float:
        rates.append(p)
        return 1e-3 * warmup_cosine(p, 0.1)

    metrics = pretrain_epoch(
        method, batches, optimizer, torch.device("cpu"), (0.0, 0.0), lr_at=lr_at, lr_progress=(0.0, 0.1)
    )
    assert rates == pytest.approx([0.025, 0.05, 0.075, 0.1])  # no step at a zero rate
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # warmed up by the end of the epoch
    assert metrics["ratio"] == pytest.approx(amr_ratio(0.0))  # the ratio stayed the round's
