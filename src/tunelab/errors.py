"""One exception type for every input a user can get wrong.

The CLI prints its message as one line and exits non-zero; nothing else catches it.
"""


class TunelabError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""

    exit_code = 2
