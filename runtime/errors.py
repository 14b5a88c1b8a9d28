"""One exception type for bad input, so the CLI can print it as one clear line (no traceback)."""


class UserError(Exception):
    """Something the user gave us is wrong: the message says which file, which field, what was expected."""


class RequestError(UserError):
    """A request refused, naming the field (runtime/request.py's canonical name) it is about: the HTTP API's `param`
    and `code`."""

    def __init__(self, field: str, message: str, code: str | None = None):
        super().__init__(message)
        self.field, self.code = field, code


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


class Terminated(BaseException):
    """SIGTERM, handled like Ctrl-C: it unwinds through every `finally`, so nothing half-written is left."""


# Signals received. A handler's exception can be swallowed when the signal lands inside a weakref or gc
# callback ("Exception ignored in ..."), so the signal is also remembered here and checked again before
# anything is published (export/atomic.py) and between stages.
_received: list[int] = []


def on_signal(signum, frame):
    import signal

    _received.append(signum)
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def check_interrupted() -> None:
    """Raise again a SIGINT/SIGTERM whose first exception was swallowed."""
    import signal

    if _received:
        raise KeyboardInterrupt() if _received[0] == signal.SIGINT else Terminated()


def interrupted() -> int | None:
    return _received[0] if _received else None
