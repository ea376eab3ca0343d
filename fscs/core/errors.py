"""The one exception type for bad user input: stages print its message and exit non-zero."""


class FscsError(Exception):
    """A problem with the user's data, params or artifacts; the message names the file or value at fault."""
