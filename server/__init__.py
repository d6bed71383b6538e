"""The aggregation server: a Flower ServerApp running the two-phase federation."""
