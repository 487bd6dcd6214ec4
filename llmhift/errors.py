"""Errors a user fixes, shared by every layer: each prints as one ``error:`` line, never a traceback."""


class ConfigError(ValueError):
    """A yaml or override that cannot run; the message starts with the offending key."""
