"""Errors a user can cause and fix. The CLI prints these as one line, without a traceback."""


class FlamingoError(Exception):
    """Base class: bad input, bad configuration or a mismatched checkpoint."""


class ConfigError(FlamingoError):
    pass


class CheckpointError(FlamingoError):
    pass
