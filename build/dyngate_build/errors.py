"""Typed errors of dyngate, all under one base class.

Every message names the field or input, the bad value, what is allowed and, where there is one, the fix.
The CLI prints `DyngateError` messages without a traceback; anything else is a bug.
"""

from __future__ import annotations


class DyngateError(Exception):
    """Base class of every error dyngate raises on purpose."""


class ConfigError(DyngateError):
    """A setting (CLI flag, config field, environment variable) has a value that cannot work."""


class SourceError(DyngateError):
    """A model checkpoint or data source is missing, unreadable or of an unsupported family."""


class ExportError(DyngateError):
    """Exporting a variant failed, or the exported graph disagrees with the PyTorch reference."""


class RepositoryError(DyngateError):
    """The Triton model repository could not be written or read."""


class ServingError(DyngateError):
    """Triton Inference Server could not be started, reached, or answered with an error."""


class TritonUnreachable(ServingError):
    """Triton Inference Server does not answer at the address given (down, restarting, or a wrong address)."""


class InputError(DyngateError):
    """A request input (text, image bytes) cannot be served; the message says why."""


def check_choice(field: str, value: object, allowed: "list | tuple | set | dict") -> None:
    """Raise `ConfigError` unless `value` is one of `allowed`, naming the field and the allowed values."""
    if value not in allowed:
        raise ConfigError(f"{field}={value!r} is not supported; choose one of: {', '.join(map(str, sorted(allowed)))}")


def check_range(field: str, value: float, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> None:
    """Raise `ConfigError` unless `low <= value <= high` (ends excluded where `*_open`)."""
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(f"{field}={value!r} is outside {lo}{low}, {high}{hi}")
