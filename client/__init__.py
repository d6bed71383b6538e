"""The hospital site: a Flower ClientApp that translates messages into amlp_core calls."""
