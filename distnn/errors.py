"""The one exception type for a user's mistake: shown as one line, never a traceback."""


class UserError(Exception):
    """Bad input or settings. ``agreed`` is True when every rank raised it together."""

    def __init__(self, message, agreed=False):
        super().__init__(message)
        self.agreed = agreed
