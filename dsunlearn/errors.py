"""Errors every layer raises (a module of its own, so that modules ``config`` imports can raise them too)."""


class ConfigError(ValueError):
    """A user-caused configuration problem. The CLI prints it on one line and exits with code 2."""
