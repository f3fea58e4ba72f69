"""The error a user can act on: a bad setting, file or picture, said in one line."""


class UsageError(ValueError):
    """A bad setting, file or picture of the user's; its message says what to change. The command-line tools print
    it as one line without a traceback; any other exception is a bug and keeps its traceback."""
