"""Hydra finds launchers only in the hydra_plugins namespace: conf/hydra/launcher/submitit_slurm.yaml names this
package's launcher (slurm_launcher.py)."""
