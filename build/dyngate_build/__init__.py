"""dyngate's build step: sources, data, training, techniques, export, Triton model repository, evaluation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dyngate")  # the distribution's own version, never another package's
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
