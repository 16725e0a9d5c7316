"""User-facing errors. The CLI prints ``FipsError`` as one line and exits non-zero (no traceback)."""


class FipsError(Exception):
    """A mistake in the user's input (path, option, file); its message is a complete sentence."""

    exit_code = 2


class CheckpointError(FipsError):
    """A checkpoint that is truncated, altered, of an unknown version, or incomplete."""
