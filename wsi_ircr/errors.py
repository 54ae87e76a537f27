"""The one exception type that reaches users as a one-line message."""


class UserError(Exception):
    """Bad input or configuration: the message names the file, the problem and the fix.

    The CLI prints ``error: <message>`` on one line and exits with status 2 (no traceback
    unless ``--debug``).
    """
