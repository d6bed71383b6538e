"""The method comparison benchmark in parts; ``python -m simulations.benchmarks.compare`` runs it."""
