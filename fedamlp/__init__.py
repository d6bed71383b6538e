"""fedamlp: federated AMLP pretraining and segmentation fine-tuning (command line entry point)."""

__version__ = "0.1.0"
