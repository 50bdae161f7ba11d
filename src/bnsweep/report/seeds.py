"""What each research note (shared/seeds/00x_*.txt) states about its own setting, as config keys.

A claim is first tested "as stated": in a cell whose config matches every key its seed's note states (the
rest the note leaves open, and we choose; docs/report.md#claims says what and why). ``stated`` holds the
setting the note's own model uses; ``bn`` the note's BN, which applies to the arm of a comparison that
carries the note's BN (the other arm is the claim's counterfactual). tests/test_claims.py composes every
as-stated cell and checks it against these keys, so a study that drifts from its seed fails a test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SeedNote:
    seed: str
    source: str  # what the note is, in a few words
    stated: dict[str, Any]  # config key -> the value the note's model uses
    bn: dict[str, Any] = field(default_factory=dict)  # the note's BN (model.bn.* keys)
    open: str = ""  # what the note leaves open, and what we chose for it


SGD = {"optimizer._target_": "torch.optim.SGD", "optimizer.momentum": 0.0}

NOTES = {
    "000": SeedNote("000", "notes on BN and sigmoid saturation; loads Fashion-MNIST (tfds)",
                    {"data.name": "fashion_mnist", "model.activation": "sigmoid"},
                    {"model.bn.placement": "before_act"},
                    open="model, init, optimizer, LR, epochs: ours are an MLP 784-300-100-10, glorot_uniform "
                         "(Keras's Dense default), SGD at Keras's default lr 0.01, batch 32, 2 epochs on 10,000 "
                         "images"),
    "001": SeedNote("001", "Keras notebook: MNIST MLP with and without BN, timed",
                    {"data.name": "mnist", "data.limit_train": None, "data.val_size": 5000, "data.batch_size": 32,
                     "model.hidden": [300, 100], "model.activation": "leaky_relu", "model.init": "he_normal",
                     "model.act_args.leaky_relu.negative_slope": 0.3, **SGD, "optimizer.lr": 0.001,
                     "trainer.max_epochs": 10},
                    {"model.bn.placement": "after_act", "model.bn.input": True},
                    open="nothing that matters: the seed's Keras code, in PyTorch (Keras's BN momentum and eps)"),
    "002": SeedNote("002", "Géron-style notes: MLP with input BN and BN after each hidden layer",
                    {"model.hidden": [300, 100], "model.activation": "relu", "model.init": "glorot_uniform"},
                    {"model.bn.placement": "after_act", "model.bn.input": True},
                    open="data (28x28 input), optimizer, LR, epochs: ours are Fashion-MNIST (the book's), SGD at "
                         "Keras's default lr 0.01, batch 32, 2 epochs on 10,000 images"),
    "003": SeedNote("003", "notes with a Dense(8, HeNormal) -> BN -> ReLU example",
                    {"model.hidden": [8], "model.activation": "relu", "model.init": "he_normal"},
                    {"model.bn.placement": "before_act", "model.bn.affine": True},
                    open="data, optimizer, LR, epochs: MNIST, SGD lr 0.01, batch 32, 2 epochs on 10,000 images"),
    "004": SeedNote("004", "course notes: normalize the pre-activation z, drop the bias",
                    {},
                    {"model.bn.placement": "before_act", "model.bn.keep_bias": False},
                    open="everything but BN's place and the bias: MNIST MLP 784-300-100-10, relu, he_normal, SGD "
                         "lr 0.01, batch 32, 2 epochs on 10,000 images"),
}

# The seeds' own numbers, quoted beside ours
SEED_VALUES = {
    "001-acc": "≈91% → ≈93% (10 epochs)",
    "001-time": "48.98 s → 69.16 s per 10 epochs (1.41x)",
}


def mismatches(cfg: Any, note: SeedNote, with_bn: bool = True, varies: tuple[str, ...] = ()) -> list[str]:
    """Where a composed train config departs from what ``note`` states: 'key: ours != the note's' per key.

    ``with_bn``: also hold the config to the note's BN (the arm that carries it); ``varies``: keys the claim
    changes on purpose. A ``data.limit_train`` the note states as None (every image) must be None here too.
    """
    from omegaconf import OmegaConf

    from bnsweep.training.norms import canonical, legacy

    out = []
    for key, want in {**note.stated, **(note.bn if with_bn else {})}.items():
        if key in varies:
            continue
        have = OmegaConf.select(cfg, key, default="<missing>")
        if key.startswith("model.bn."):  # the old form: read what the model gets (model.norm, bn keys mapped in)
            have = legacy(canonical(cfg.model.get("norm"), cfg.model.get("bn")))[key.removeprefix("model.bn.")]
        have = OmegaConf.to_container(have) if OmegaConf.is_config(have) else have
        same = (math.isclose(have, want) if isinstance(want, float) and isinstance(have, (int, float))
                else have == want)
        if not same:
            out.append(f"{key}: {have!r} != the note's {want!r}")
    return out
