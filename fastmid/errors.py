"""User-facing errors: raised anywhere, reported by the CLI as one line with exit code 2."""


class UserError(Exception):
    """A problem with the user's input (files, config, model layout) rather than a bug."""
