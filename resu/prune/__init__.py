"""Pruning: importance scores, selection of the pruned set, calibration for Wanda."""
