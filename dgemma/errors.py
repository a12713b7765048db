"""Exceptions a user can cause. Each carries one sentence meant to be shown as is (the CLI prints it alone)."""


class DgemmaError(Exception):
    """Base class: a problem with the user's input, files or environment, not a bug in dgemma."""


class ConfigError(DgemmaError, ValueError):
    """A config.json / generation_config.json that dgemma cannot use."""


class LoadError(DgemmaError):
    """A checkpoint that cannot be found, read or matched to the model."""
