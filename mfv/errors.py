"""Exceptions that carry an actionable message for the user."""


class MfvError(Exception):
    """Base class of every error mfv raises on bad input."""


class MissingWeightsError(MfvError, FileNotFoundError):
    """Model weights were not found where they were expected."""


class ConfigError(MfvError, ValueError):
    """A configuration value is invalid; the message lists the valid values."""


class DataError(MfvError, ValueError):
    """Input data (images, scene graphs, object folders) is malformed."""


class IncompatibleVectorError(MfvError, ValueError):
    """A function vector was saved for a different backbone or layer layout."""
