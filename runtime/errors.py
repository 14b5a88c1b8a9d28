"""One exception type for bad input, so the CLI can print it as one clear line (no traceback)."""


class UserError(Exception):
    """Something the user gave us is wrong: the message says which file, which field, what was expected."""


def read_json(path):
    """Parse a JSON file; a missing, unreadable or malformed file is a UserError naming it."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None
