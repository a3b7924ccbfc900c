"""The one exception type a user can cause. The CLI prints it as a single line and exits 2."""


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed row, a wrong layer index.

    The message is one sentence that says what is wrong and what to do about it.
    """
