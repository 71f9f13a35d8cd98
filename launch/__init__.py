"""Launchers for distnn: Slurm and PBS batch scripts, a local launcher, sweeps."""
