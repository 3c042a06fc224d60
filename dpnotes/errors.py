"""The one base class of the problems a user can fix.

Anything raised as a `UserError` (a corpus row, a setting, a checkpoint that belongs to another run)
reaches the terminal as one line, `error: <message>`, and exit status 2 (dpnotes.console); every
other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A problem with the user's input or settings; the message says where and what, never note text."""
