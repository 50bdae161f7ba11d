"""train.diagnostics: per-layer percentiles and gradient norms, without changing a single number of the run."""

from __future__ import annotations

import pytest
from helpers import make_cfg

from bnsweep.errors import ConfigError
from bnsweep.training.diagnostics import Diagnostics, read_csv
from bnsweep.training.run import run_training

SMALL = ["data.limit_train=1000", "data.val_size=500", "trainer.max_epochs=1", "model.hidden=[32,16]",
         "model.activation=sigmoid", "model.bn.placement=before_act"]


def test_diagnostics_sample_every_layer_and_leave_the_run_unchanged() -> None:
    plain = run_training(make_cfg(*SMALL), track=False)
    diag = Diagnostics(every=4)
    watched = run_training(make_cfg(*SMALL), track=False, callbacks=[diag])
    assert watched.history == [{**r, "epoch_time_s": w["epoch_time_s"]} for r, w in zip(
        plain.history, watched.history, strict=True)]  # same numbers, only the clock differs
    rows = read_csv(diag.to_csv())
    assert {r["layer"] for r in rows} == {"fc1", "fc2", "out"}
    steps = sorted({int(r["step"]) for r in rows})
    assert steps == list(range(0, 32, 4))  # 1000 images / batch 32 = 32 steps, every 4th
    for r in rows:
        assert r["grad_norm"] > 0
        if r["layer"] != "out":
            assert r["p15"] < r["p50"] < r["p85"]
    assert not diag._handles  # hooks removed after fit


def test_diagnostics_are_off_by_default_and_checked() -> None:
    assert Diagnostics.from_config(make_cfg().train) is None
    assert Diagnostics.from_config(make_cfg("train.diagnostics=true").train).every == 50
    with pytest.raises(ConfigError, match=r"train.diagnostics_every=0 is not allowed"):
        Diagnostics.from_config(make_cfg("train.diagnostics=true", "train.diagnostics_every=0").train)
