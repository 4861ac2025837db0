"""Launching: accelerate / DeepSpeed / SLURM command building (launch/ holds the scripts)."""
