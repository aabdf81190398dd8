"""Drafter training, calibration and acceptance evaluation."""
