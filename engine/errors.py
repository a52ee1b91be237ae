"""The two errors a run reports as one line (train.py prints `error: <message>` and exits 2 or 1)."""


class ConfigError(ValueError):
    """Invalid user input; the message is one line: what was wrong and what is allowed."""


class RunError(RuntimeError):
    """A fault met during a run (a full disk, an unreadable image); the message is one line: what and where."""
