"""Experiment configs and the single-machine simulation and benchmark runners."""
