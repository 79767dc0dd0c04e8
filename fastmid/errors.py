"""User-facing errors: raised anywhere, reported by the CLI as one line with exit code 2."""


class UserError(ValueError):
    """A problem with the user's input (files, config, model layout) rather than a bug.

    A ``ValueError``, so library callers catch bad arguments the usual way.
    """
