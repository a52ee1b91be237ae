"""Hydra's optuna sweeper (``hparams_search=lr_optuna``), with a continued search's trials in folders of their own.

The plugin numbers a command's jobs from 0, so the same command again (which continues the study stored in
optuna.db) would put its first trial into the first trial's folder, where that run already lives. Here the job
numbers continue from the study's trial count: trial N runs in the job folder ``N_...``, whatever command made it.
(The sampler's seed continues the same way: conf/hparams_search/'s ``continued_seed``.)
"""
from __future__ import annotations

from typing import List

from engine.resolvers import trials_so_far
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as PluginOptunaSweeper


class OptunaSweeper(PluginOptunaSweeper):
    def sweep(self, arguments: List[str]) -> None:
        impl = self.sweeper
        impl.job_idx = trials_so_far(impl.storage, impl.study_name)
        return impl.sweep(arguments)
