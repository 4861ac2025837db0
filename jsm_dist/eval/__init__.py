"""Evaluation: SOD metrics, input folders, jsm-eval, reports, the run report."""
