"""Hydra configs of ``python -m lightning_dpgan``; installed as the package ``lightning_dpgan.conf``."""
