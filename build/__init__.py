"""dyngate's build step: sources, data, training, techniques, export, Triton model repository, evaluation."""

__version__ = "0.1.0"
