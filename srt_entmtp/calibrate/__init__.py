"""Calibration: step-cost curves, acceptance statistics, tree search (see each module)."""
