"""The seeds' claims (shared/seeds/00x_*.txt), each tested as stated, then in settings where it could fail.

A claim names a metric, a test (superiority, non-inferiority or equivalence) and its settings. A setting
compares two arms (cells of the claims sweeps, conf/sweep/claims_*.yaml, found by their grid labels), or
one arm with itself (``within``), or one difference against another (``interaction``), under one protocol:

- ``as_stated``: the seed's own setting (report/seeds.py says what each note states; a test holds the
  sweeps to it), at the seed's LR or, where the note gives none, Keras's default;
- ``fixed_lr``: one LR shared by both arms (a point every LR-search seed tries), paired by training seed;
- ``tuned_lr``: each arm at its own best LR (the repeats), paired by seed; basin claims use the search itself.

Why each setting could make the claim fail is in ``why``; report/verdicts.py measures and decides.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

PROTOCOLS = ("as_stated", "fixed_lr", "tuned_lr")
ACTS = ("sigmoid", "tanh", "relu", "leaky_relu")
WHY_ACT = {"sigmoid": "saturates on both sides: where the seeds expect BN to matter most",
           "tanh": "saturates, but is zero-centred",
           "relu": "does not saturate for positive inputs",
           "leaky_relu": "never has a zero slope: the saturation argument has nothing to act on"}
WHERE = {  # a study's common setting, as a claims row names it
    "claims_seed001": "seed 001's model: MNIST 55,000 images, MLP 784-300-100-10, LeakyReLU, he_normal, "
                      "SGD lr 1e-3, batch 32, 10 epochs",
    "claims_act": "MNIST 10,000 images, MLP 784-100-100-10, SGD, 1 epoch",
    "claims_variants": "MNIST 10,000 images, MLP 784-100-100-10, SGD, 1 epoch",
    "claims_init": "MNIST 10,000 images, MLP 784-100-100-10, SGD, 1 epoch",
    "claims_optimizers": "MNIST 10,000 images, relu MLP 784-100-100-10, he_normal, 1 epoch",
    "claims_input": "10,000 images, MLP 784-100-100-10, SGD, 1 epoch, no hidden BN",
    "claims_depth": "MNIST 10,000 images, SGD, 1 epoch",
}
FIXED_LR = 0.1  # claims_act & co.: one SGD rate every cell trains at, on every basin seed's start grid


@dataclass(frozen=True)
class Arm:
    """One cell of a claims sweep: the study and the grid labels that pick it."""

    study: str
    cell: tuple[tuple[str, str], ...]

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.cell)

    @property
    def label(self) -> str:
        return ", ".join(v for _, v in self.cell)


def arm(study: str, **labels: str) -> Arm:
    return Arm(study, tuple(labels.items()))


@dataclass(frozen=True)
class Setting:
    """Where a claim is tested: first vs second (or ``first`` alone), under one protocol.

    ``interaction``: (first - second) - (base_first - base_second), all paired by seed. ``lr``: the shared
    rate of a fixed-LR comparison (None: every trial of an as-stated cell, which has one rate).
    ``varies``: config keys a claim changes on purpose in an as-stated arm (e.g. the init of the init claim).
    ``test``/``expect``/``margin`` override the claim's for this setting.
    """

    name: str
    protocol: str
    first: Arm
    second: Arm | None = None
    base_first: Arm | None = None
    base_second: Arm | None = None
    lr: float | None = None
    why: str = ""
    varies: tuple[str, ...] = ()
    test: str | None = None
    expect: int | None = None
    margin: float | None = None
    seed_arm: str = "first"  # which arm carries the note's BN, for the as-stated check


@dataclass(frozen=True)
class Claim:
    id: str
    claim: str
    seed: str
    metric: str
    test: str = "superiority"  # superiority | non_inferiority | equivalence
    expect: int = 1  # the sign the claim predicts for first - second
    margin: float = 0.0  # non-inferiority / equivalence margin, in the metric's units
    how: str = ""  # what the metric is, as the report says it
    settings: tuple[Setting, ...] = ()

    def of(self, s: Setting) -> Claim:
        """The claim as tested in ``s`` (a setting may test it another way: see Setting)."""
        return replace(self, test=s.test or self.test, expect=self.expect if s.expect is None else s.expect,
                       margin=self.margin if s.margin is None else s.margin)


# ---------------------------------------------------------------------- settings, built the same way per study


def _lr(protocol: str, lr: float) -> float | None:
    return lr if protocol == "fixed_lr" else None


def across(study: str, first: str, second: str, protocols: tuple[str, ...] = ("fixed_lr", "tuned_lr"),
           lr: float = FIXED_LR) -> tuple[Setting, ...]:
    """BN placement ``first`` vs ``second`` in each activation's setting of ``study``."""
    return tuple(
        Setting(f"{act}, {WHERE[study]}: {first} vs {second}", p, arm(study, model=act, placement=first),
                arm(study, model=act, placement=second), lr=_lr(p, lr), why=WHY_ACT[act])
        for act in ACTS for p in protocols)


def placements(study: str = "claims_act", protocols: tuple[str, ...] = ("fixed_lr", "tuned_lr")
               ) -> tuple[Setting, ...]:
    """before_act vs none and after_act vs none in every activation's setting."""
    return (*across(study, "before_act", "none", protocols), *across(study, "after_act", "none", protocols))


def seeds_pair(first: str, second: str, name: str, why: str, protocol: str = "as_stated",
               **kw: object) -> Setting:
    """Two experiments of claims_seeds (each note's own model at Keras's default rate)."""
    return Setting(name, protocol, arm("claims_seeds", experiment=first), arm("claims_seeds", experiment=second),
                   why=why, **kw)


S001 = "seed 001's model and training"
FASHION_000 = seeds_pair("seed000_bn", "seed000_nobn", "seed 000's setting: Fashion-MNIST, sigmoid MLP 784-300-100-10, "
                         "SGD lr 0.01, 2 epochs on 10,000 images: before_act vs none",
                         "Fashion-MNIST and a saturating activation", protocol="fixed_lr")
FASHION_002 = seeds_pair("seed002_bn", "seed002_nobn", "seed 002's setting: Fashion-MNIST, relu MLP 784-300-100-10, "
                         "input BN + BN after each activation, SGD lr 0.01, 2 epochs on 10,000 images: BN vs none",
                         "Fashion-MNIST, BN after the activation and on the input", protocol="fixed_lr")


def seed001(first: str, second: str) -> Setting:
    return Setting(f"{S001}: {first} vs {second}", "as_stated", arm("claims_seed001", bn=first),
                   arm("claims_seed001", bn=second), why="the seed's own setting")


def depth(protocols: tuple[str, ...] = ("fixed_lr", "tuned_lr")) -> tuple[Setting, ...]:
    """BN's gain with 8 hidden layers minus its gain with 2 (claims_act), per activation."""
    return tuple(
        Setting(f"{act}, 8 vs 2 hidden layers of 100, MNIST 10,000 images, SGD, 1 epoch: BN's gain (before_act - "
                f"none)", p, arm("claims_depth", model=act, placement="before_act"),
                arm("claims_depth", model=act, placement="none"), arm("claims_act", model=act, placement="before_act"),
                arm("claims_act", model=act, placement="none"), lr=_lr(p, FIXED_LR),
                why=f"{WHY_ACT[act]}; depth compounds it")
        for act in ACTS for p in protocols)


def inits(protocols: tuple[str, ...] = ("fixed_lr", "tuned_lr")) -> tuple[Setting, ...]:
    good = {"tanh": "glorot_uniform", "relu": "he_normal"}
    out = []
    for act in ("tanh", "relu"):
        for std in ("1", "0.01"):
            for p in protocols:
                out.append(Setting(
                    f"{act}, init normal(std {std}) vs {good[act]}, {WHERE['claims_init']}: BN's gain (before_act - "
                    f"none)", p, arm("claims_init", model=f"{act}_std{std}", placement="before_act"),
                    arm("claims_init", model=f"{act}_std{std}", placement="none"),
                    arm("claims_act", model=act, placement="before_act"),
                    arm("claims_act", model=act, placement="none"), lr=_lr(p, FIXED_LR),
                    why="weights far too large (saturation, exploding)" if std == "1" else
                        "weights far too small (vanishing signal)"))
    return tuple(out)


def optimizers(protocols: tuple[str, ...] = ("fixed_lr", "tuned_lr")) -> tuple[Setting, ...]:
    keras_lr = {"momentum": 0.01, "adam": 1e-3, "rmsprop": 1e-3}
    out = [Setting(f"relu, {WHERE['claims_act']}, plain SGD: before_act vs none", p,
                   arm("claims_act", model="relu", placement="before_act"),
                   arm("claims_act", model="relu", placement="none"),
                   lr=_lr(p, FIXED_LR), why="plain gradient descent, no adaptive step") for p in protocols]
    for opt, lr in keras_lr.items():
        for p in protocols:
            out.append(Setting(f"{opt}, {WHERE['claims_optimizers']}: before_act vs none", p,
                               arm("claims_optimizers", optimizer=opt, placement="before_act"),
                               arm("claims_optimizers", optimizer=opt, placement="none"), lr=_lr(p, lr),
                               why="momentum carries stale directions across BN's changing scale"
                               if opt == "momentum" else "adaptive per-parameter steps overlap with BN's rescaling"))
    return tuple(out)


def inputs(protocols: tuple[str, ...] = ("fixed_lr", "tuned_lr")) -> tuple[Setting, ...]:
    return tuple(
        Setting(f"{act}, {data}, {WHERE['claims_input']}: input BN on raw pixels vs standardized pixels", p,
                arm("claims_input", data=data, model=act, experiment="input_bn"),
                arm("claims_input", data=data, model=act, experiment="standardized"), lr=_lr(p, FIXED_LR),
                why=f"{'a saturating activation: badly scaled inputs hurt most' if act == 'sigmoid' else 'relu'}; "
                    f"{'Fashion-MNIST (denser images)' if data == 'fashion_mnist' else 'MNIST'}")
        for data in ("mnist", "fashion_mnist") for act in ("sigmoid", "relu") for p in protocols)


def variants(variant: str, protocols: tuple[str, ...] = ("fixed_lr", "tuned_lr"), bn_first: bool = True
             ) -> tuple[Setting, ...]:
    """claims_act's before_act cell vs claims_variants' ``variant`` (no_affine, keep_bias), per activation."""
    out = []
    for act in ACTS:
        for p in protocols:
            ours = arm("claims_act", model=act, placement="before_act")
            theirs = arm("claims_variants", model=act, bn=variant)
            first, second = (ours, theirs) if bn_first else (theirs, ours)
            out.append(Setting(f"{act}, {WHERE['claims_act']}: {first.label} vs {second.label}", p, first, second,
                               lr=_lr(p, FIXED_LR), why=WHY_ACT[act]))
    return tuple(out)


def within(protocols: tuple[str, ...] = ("fixed_lr", "tuned_lr")) -> tuple[Setting, ...]:
    return tuple(Setting(f"{act}, {WHERE['claims_act']}: {pl}", p, arm("claims_act", model=act, placement=pl),
                         lr=_lr(p, FIXED_LR), why=WHY_ACT[act])
                 for act in ACTS for pl in ("before_act", "after_act") for p in protocols)


def basins() -> tuple[Setting, ...]:
    """Basin comparisons come from the LR search itself (8 seeds in claims_act), BN before the activation (the
    usual place) vs none: with Holm over more rows, 8 seeds (exact p >= 2/256) could never resolve one."""
    return across("claims_act", "before_act", "none", protocols=("tuned_lr",))


SEED002_BASIN = Setting("seed 002's model: Fashion-MNIST, relu MLP 784-300-100-10, glorot_uniform, input BN + BN after "
                        "each activation, SGD, 1 epoch on 10,000 images: BN vs none", "as_stated",
                        arm("claims_seed002", experiment="seed002_bn"),
                        arm("claims_seed002", experiment="seed002_nobn"),
                        why="the seed's own setting")
RELU_004 = Setting(f"relu, {WHERE['claims_act']}: before_act vs none (seed 004 states only BN's place and the bias)",
                   "as_stated", arm("claims_act", model="relu", placement="before_act"),
                   arm("claims_act", model="relu", placement="none"), why="the note's setting: BN on z, no bias")
LATENCY_SETTINGS = {  # name -> (model config, input shape, batch); see verdicts.latency_values
    "seed 002's model (MLP 784-300-100-10, input BN + BN after each activation), batch 1": ("seed002", 1),
    "seed 002's model, batch 1024": ("seed002", 1024),
    "MLP with 8 hidden layers of 100, BN before each activation, batch 1": ("deep", 1),
    "MLP with 8 hidden layers of 100, BN before each activation, batch 1024": ("deep", 1024),
    "CNN 32-64 conv + 128 dense, BN before each activation, batch 1": ("cnn", 1),
    "CNN 32-64 conv + 128 dense, BN before each activation, batch 64": ("cnn", 64),
}


def latency(first: str) -> tuple[Setting, ...]:
    out = []
    for i, (name, (model, batch)) in enumerate(LATENCY_SETTINGS.items()):
        protocol = "as_stated" if i == 0 else "fixed_lr"
        out.append(Setting(name, protocol, arm("latency", model=model, batch=str(batch), net=first),
                           arm("latency", model=model, batch=str(batch), net="nobn"),
                           why="the seed's own model" if i == 0 else
                           ("many BN layers" if model == "deep" else "conv BN over feature maps" if model == "cnn"
                            else "large batches amortize per-layer overhead")))
    return tuple(out)


CLAIMS = [
    Claim("001-acc", "BN raises accuracy (91% → 93%)", "001", "test_acc",
          how="test accuracy, paired by seed", settings=(
              seed001("after_act", "none"), *placements(), FASHION_000, FASHION_002)),
    Claim("001-epochs", "BN reaches high accuracy in fewer epochs", "001", "epochs_to_converge", expect=-1,
          how="epochs to the study's target val acc; runs that never got there are censored, not averaged",
          settings=(seed001("after_act", "none"), *placements(), FASHION_000, FASHION_002)),
    Claim("001-time", "BN costs time per epoch (48 s → 69 s)", "001", "s_per_epoch",
          how="seconds per epoch, ratio first / second, both trained one network at a time (population size 1)",
          settings=(seed001("after_act", "none"), *placements(), FASHION_000, FASHION_002)),
    Claim("001-after", "BN after the activation beats BN before it ('always use it after')", "001", "test_acc",
          how="test accuracy, after_act minus before_act",
          settings=(seed001("after_act", "before_act"), *across("claims_act", "after_act", "before_act"))),
    Claim("002-lr", "BN allows much larger learning rates", "002", "basin_upper",
          how="the LR basin's upper edge (decades, each seed's bracket midpoint), paired by LR-search seed",
          settings=(SEED002_BASIN, *basins())),
    Claim("004-range", "BN widens the range of usable learning rates (an easier search)", "004", "basin_width",
          how="the LR basin's width in decades (both edges bracketed), paired by LR-search seed",
          settings=(RELU_004, *[s for s in basins() if s.first != RELU_004.first],
                    replace(SEED002_BASIN, protocol="tuned_lr",
                            why="Fashion-MNIST, BN after the activation and on the input"))),
    Claim("000-saturation", "BN keeps the activation's inputs out of its flat tails (less saturation)", "000",
          "saturation", expect=-1,
          how="fraction of the activation's inputs where its slope is below 10% of its peak (point: act_in)",
          settings=(replace(FASHION_000, protocol="as_stated"), *placements())),
    Claim("000-drift", "BN reduces the drift of a layer's input distribution (internal covariate shift)", "000",
          "drift", expect=-1,
          how="drift of the hidden Linear outputs of layers 2+ (point: linear_out, never a BN output)",
          settings=(replace(FASHION_000, protocol="as_stated"), *placements(),
                    *[Setting(s.name.replace(": BN's gain (before_act - none)", ": before_act vs none").replace(
                        "8 vs 2 hidden layers of 100", "8 hidden layers of 100"), s.protocol, s.first, s.second,
                        lr=s.lr, why="depth: more layers whose inputs can drift") for s in depth()])),
    Claim("000-gradients", "BN keeps gradients from vanishing in the early layers", "000, 002", "grad_ratio",
          how="log10 of the first hidden layer's weight-gradient norm over the output layer's (mean over training)",
          settings=(replace(FASHION_000, protocol="as_stated"), *placements(),
                    *[Setting(s.name.replace(": BN's gain (before_act - none)", ": before_act vs none").replace(
                        "8 vs 2 hidden layers of 100", "8 hidden layers of 100"), s.protocol, s.first, s.second,
                        lr=s.lr, why="depth: where gradients vanish") for s in depth()])),
    Claim("002-regularizes", "BN acts as a regularizer (a smaller train-test gap)", "002, 004", "train_test_gap",
          expect=-1, how="train accuracy in eval mode on a fixed training subset minus test accuracy",
          settings=(seeds_pair("seed002_bn", "seed002_nobn", "seed 002's setting: BN vs none",
                               "the seed's own setting"), *placements())),
    Claim("002-running", "BN's running averages serve inference as well as population statistics", "002, 003",
          "precise_bn_gain", test="equivalence", expect=0, margin=0.005,
          how="test acc with statistics recomputed on the training set minus with running averages; within ±0.5 pp",
          settings=(Setting("seed 002's setting: its BN model", "as_stated",
                            arm("claims_seeds", experiment="seed002_bn"), why="the seed's own setting"), *within())),
    Claim("002-init", "BN makes the network much less sensitive to weight initialization", "002", "test_acc",
          how="BN's test-acc gain under a poor init minus its gain under the usual init, paired by seed",
          settings=(Setting("seed 002's setting, init normal(std 1) vs glorot_uniform: BN's gain", "as_stated",
                            arm("claims_seeds", experiment="seed002_badinit"),
                            arm("claims_seeds", experiment="seed002_nobn_badinit"),
                            arm("claims_seeds", experiment="seed002_bn"),
                            arm("claims_seeds", experiment="seed002_nobn"),
                            why="the seed's own model, with a poor init", varies=("model.init", "model.init_std")),
                    *inits())),
    Claim("004-optimizers", "BN works with gradient descent, momentum, Adam and RMSprop", "004", "test_acc",
          test="non_inferiority", margin=0.005,
          how="test accuracy, BN minus none; works = not worse by more than 0.5 pp (non-inferiority)",
          settings=(seeds_pair("seed004_bn", "seed004_nobn", "seed 004's setting (SGD): before_act vs none",
                               "the note's setting"), *optimizers())),
    Claim("002-input", "BN on the input can replace standardizing the data", "002", "test_acc",
          test="non_inferiority", margin=0.005,
          how="test accuracy, raw pixels + input BN minus standardized pixels without it; within 0.5 pp",
          settings=(seeds_pair("seed002_bn", "seed002_std", "seed 002's setting: input BN vs standardized data",
                               "the seed's own setting"), *inputs())),
    Claim("002-depth", "BN matters little in a shallow network and much more in a deep one", "002", "test_acc",
          how="as stated: BN's effect in the seed's 2-layer net within ±1 pp (equivalence); across settings: BN's "
              "gain with 8 hidden layers minus with 2",
          settings=(seeds_pair("seed002_bn", "seed002_nobn", "seed 002's setting (2 hidden layers): BN vs none",
                               "the seed's own shallow network", test="equivalence", expect=0, margin=0.01),
                    *depth())),
    Claim("002-inference", "BN slows inference", "002", "latency", expect=1,
          how="forward-pass latency, BN (eval mode) / no BN, paired by measurement round",
          settings=latency("bn")),
    Claim("002-folding", "Folding BN into the previous layer removes its inference cost", "002", "latency",
          test="equivalence", expect=0, margin=0.05,
          how="forward-pass latency, BN folded / no BN; removed = within ±5% (equivalence)",
          settings=latency("folded")),
    Claim("003-affine", "BN's γ and β restore the layer's capacity", "003", "train_acc_eval",
          how="accuracy on a fixed training subset (eval mode): fit, with γ/β minus without",
          settings=(seeds_pair("seed003_bn", "seed003_noaffine", "seed 003's example (one hidden layer of 8, relu): "
                               "γ/β on vs off", "the seed's own narrow layer"), *variants("no_affine"))),
    Claim("004-bias", "The bias before BN is redundant (β replaces it)", "004", "test_acc", test="equivalence",
          expect=0, margin=0.003,
          how="test accuracy, bias dropped minus kept; redundant = within ±0.3 pp (equivalence)",
          settings=(seeds_pair("seed004_bn", "seed004_bias", "seed 004's setting: bias dropped vs kept",
                               "the note's setting"), *variants("keep_bias"))),
]

CLAIM_COLUMNS = ["claim_id", "claim", "seed", "protocol", "setting", "metric", "first", "second", "diff", "lo", "hi",
                 "n", "verdict", "resolvable", "seed_value", "note"]
SUMMARY_COLUMNS = ["claim_id", "as_stated", "settings", "supported", "contradicted", "not_resolved", "overall"]
SWEEPS = ("claims_seed001", "claims_seeds", "claims_seed002", "claims_act", "claims_variants", "claims_init",
          "claims_optimizers", "claims_input", "claims_depth")
