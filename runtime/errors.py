"""One exception type for bad input, so the CLI can print it as one clear line (no traceback)."""


class UserError(Exception):
    """Something the user gave us is wrong: the message says which file, which field, what was expected."""
