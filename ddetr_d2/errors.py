"""User-facing errors: bad input that a person can fix (a path, a config key, a dataset row, weights
that do not fit). Entry points print them as one line and exit non-zero, without a traceback; every
other exception is a bug and keeps its traceback."""

__all__ = ["UserError", "ConfigError", "WeightsError"]


class UserError(Exception):
    """Base class of errors caused by the user's input; the message names the file, key or shape."""


class ConfigError(UserError, ValueError):
    """A config file that does not exist, an unknown key, a bad value, odd ``--opts``."""


class WeightsError(UserError, ValueError):
    """Weights that are missing, unreadable, or do not fit the model built from the config."""
