"""The error of an invalid configuration (its own module so every config module can raise it)."""

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and a valid alternative."""
