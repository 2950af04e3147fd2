"""The one exception type a user sees: a one-line message and an exit code."""


class MoechatError(Exception):
    """A problem the user can fix (bad path, bad flag, model too big...).

    Front ends print `str(err)` on one line to stderr and exit with `exit_code`;
    they never show a traceback for it.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
