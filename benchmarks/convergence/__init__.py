"""Convergence benchmark: LoRA vs SDS-LoRA (see run.py)."""
