"""Hydra finds sweepers only in the hydra_plugins namespace: conf/hparams_search/ names this package's sweeper
(optuna_sweeper.py)."""
