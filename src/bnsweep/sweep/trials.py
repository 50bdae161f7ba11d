"""A claimed trial's train config: its sampled (or, for a repeat, the cell's best) parameters, seed and run name."""

from __future__ import annotations

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from bnsweep.sweep.definition import SweepSpec
from bnsweep.sweep.search import SEED_INDEX, SEED_STRIDE
from bnsweep.sweep.slots import best_trial, trial_tags
from bnsweep.tracking.names import trial_run_name


class Trials:
    """Part of ``worker.Worker``: turning a claimed trial into the config it trains."""

    def trial_config(self, study: optuna.Study, trial: optuna.Trial) -> DictConfig | None:
        """The trial's train config (its sampled or repeated params); None if it already failed."""
        spec = SweepSpec.from_attrs(study.user_attrs)
        cfg = self.config(study).copy()
        repeat = trial.user_attrs.get("repeat")
        if repeat and not self.set_repeat(study, trial, spec, cfg):
            return None
        if not repeat:  # basin seed i trains with seed + SEED_STRIDE * i (sweep/search.py); 0 by default
            seed = int(cfg.seed) + SEED_STRIDE * int(trial.user_attrs.get(SEED_INDEX, 0))
            OmegaConf.update(cfg, "seed", seed, merge=False)
            trial.set_user_attr("seed", seed)
        for p in spec.params if not repeat else ():
            OmegaConf.update(cfg, p.key, p.suggest(trial), merge=False)
        OmegaConf.update(cfg, "tracking.run_name", trial_run_name(
            {p.key: OmegaConf.select(cfg, p.key) for p in spec.params}, int(cfg.seed), repeat,
            "retry_of" in trial.user_attrs), merge=False)
        return cfg

    def tags(self, study: optuna.Study, trial: optuna.Trial) -> dict[str, str]:
        return trial_tags(self.sweep, study, trial)

    def set_repeat(self, study: optuna.Study, trial: optuna.Trial, spec: SweepSpec, cfg: DictConfig) -> bool:
        """A repeat trains at the cell's best LR with seed + k; False (trial failed) if there is none."""
        best = best_trial(study.get_trials(deepcopy=False))
        if best is None:
            trial.set_user_attr("error", "no LR-search trial completed, so there is no best LR to repeat")
            study.tell(trial, state=TrialState.FAIL)
            return False
        seed = int(cfg.seed) + int(trial.user_attrs["repeat"])
        OmegaConf.update(cfg, "seed", seed, merge=False)
        trial.set_user_attr("repeat_of", best.number)
        trial.set_user_attr("seed", seed)
        for p in spec.params:
            value = best.params[p.key]
            self.storage.set_trial_param(trial._trial_id, p.key, p.dist.to_internal_repr(value), p.dist)
            OmegaConf.update(cfg, p.key, value, merge=False)
        return True
