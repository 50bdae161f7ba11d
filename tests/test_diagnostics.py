"""train.diagnostics: per-layer, per-point percentiles, saturation and gradient norms, without changing a single
number of the run."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_cfg
from torch import nn

from bnsweep.errors import ConfigError
from bnsweep.training.diagnostics import COLUMNS, POINTS, Diagnostics, derivative, read_csv, saturation_threshold
from bnsweep.training.run import run_training

SMALL = ["data.limit_train=1000", "data.val_size=500", "trainer.max_epochs=1", "model.hidden=[32,16]",
         "model.activation=sigmoid", "model.bn.placement=before_act"]


def test_diagnostics_sample_every_layer_and_point_and_leave_the_run_unchanged() -> None:
    plain = run_training(make_cfg(*SMALL), track=False)
    diag = Diagnostics(every=4)
    watched = run_training(make_cfg(*SMALL), track=False, callbacks=[diag])
    assert watched.history == [{**r, "epoch_time_s": w["epoch_time_s"]} for r, w in zip(
        plain.history, watched.history, strict=True)]  # same numbers, only the clock differs
    assert watched.metrics["test_acc"] == plain.metrics["test_acc"]
    text = diag.to_csv()
    assert text.splitlines()[0] == ",".join(COLUMNS)
    rows = read_csv(text)
    assert {(r["layer"], r["point"]) for r in rows} == {
        *((layer, p) for layer in ("fc1", "fc2") for p in POINTS), ("out", "act_in")}
    steps = sorted({int(r["step"]) for r in rows})
    assert steps == list(range(0, 32, 4))  # 1000 images / batch 32 = 32 steps, every 4th
    assert len(rows) == len(steps) * 7  # one row per (step, layer, point)
    at = {(int(r["step"]), r["layer"], r["point"]): r for r in rows}
    for r in rows:
        assert r["grad_norm"] > 0
        assert r["grad_norm"] == at[int(r["step"]), r["layer"], "act_in"]["grad_norm"]  # repeated per point
        if r["layer"] == "out":
            assert math.isnan(r["p50"]) and math.isnan(r["sat"])  # the logits have no activation
        else:
            assert r["p15"] <= r["p50"] <= r["p85"] and 0 <= r["sat"] <= 1
    # Step 0: fc1's input is the raw pixels (mostly 0), its output is unnormalized, and the activation sees
    # it through BN (gamma 1, beta 0, batch statistics): standardized, so about N(0, 1) quantiles, no saturation.
    lin_in, lin_out, act_in = (at[0, "fc1", p] for p in POINTS)
    assert lin_in["p15"] == lin_in["p50"] == 0 and lin_in["p85"] <= 1
    assert -1.4 < act_in["p15"] < -0.7 and abs(act_in["p50"]) < 0.3 and 0.7 < act_in["p85"] < 1.4
    assert act_in["sat"] < 0.02
    assert (lin_out["p15"], lin_out["p85"]) != pytest.approx((act_in["p15"], act_in["p85"]), abs=0.05)
    # fc2's input is fc1's sigmoid output: inside (0, 1), never in sigmoid's flat tails
    assert 0 < at[0, "fc2", "linear_in"]["p15"] < at[0, "fc2", "linear_in"]["p85"] < 1
    assert at[0, "fc2", "linear_in"]["sat"] == 0
    assert not diag._handles  # hooks removed after fit


@pytest.mark.parametrize(("act", "x", "saturated"), [
    (nn.Sigmoid(), [-5.0, -3.9, -3.5, 0.0, 3.5, 3.9, 5.0], [1, 1, 0, 0, 0, 1, 1]),  # |x| > ~3.66
    (nn.ReLU(), [-2.0, -0.1, 0.1, 2.0], [1, 1, 0, 0]),
    (nn.LeakyReLU(0.3), [-20.0, -1.0, 1.0, 20.0], [0, 0, 0, 0]),  # slope 0.3 >= 10% of 1
    (nn.Tanh(), [-2.0, -1.5, 0.0, 1.5, 2.0], [1, 0, 0, 0, 1]),  # 1 - tanh^2 < 0.1: |x| > ~1.82
])
def test_saturation_is_a_small_derivative_relative_to_the_activation_maximum(act, x, saturated) -> None:
    values = torch.tensor(x)
    assert (derivative(act, values).abs() < saturation_threshold(act)).int().tolist() == saturated


def test_old_diagnostics_files_still_read() -> None:
    old = "step,epoch,layer,p15,p50,p85,grad_norm\n0,1,fc1,-1,0,1,0.5\n0,1,out,,,,0.25\n"
    rows = read_csv(old)
    assert [r["point"] for r in rows] == ["act_in", "act_in"]
    assert math.isnan(rows[0]["sat"]) and rows[0]["p85"] == 1.0 and math.isnan(rows[1]["p50"])


def test_diagnostics_are_off_by_default_and_checked() -> None:
    assert Diagnostics.from_config(make_cfg().train) is None
    assert Diagnostics.from_config(make_cfg("train.diagnostics=true").train).every == 50
    with pytest.raises(ConfigError, match=r"train.diagnostics_every=0 is not allowed"):
        Diagnostics.from_config(make_cfg("train.diagnostics=true", "train.diagnostics_every=0").train)
