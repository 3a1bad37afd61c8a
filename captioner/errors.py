"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class CaptionerError(Exception):
    """A problem with the user's input (file, config, checkpoint) that deserves one clear line."""
