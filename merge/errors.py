"""Errors that reach the user as one line (exit code 2), never as a traceback."""


class EvomergeError(Exception):
    """A problem with the user's input or environment, phrased as one line that names the fix."""


class ConfigError(EvomergeError):
    """The merge config is invalid; raised before any tensor is loaded."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)
