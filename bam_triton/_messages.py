"""One-line forms of messages that users read: the CLI's errors, the sweep's failures, unreadable checkpoints."""


def first_line(error):
    """An exception's (or any object's) message as one line: its first non-empty line, stripped; "" for none."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "")
