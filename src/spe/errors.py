"""The one exception type for mistakes a user can make, and nothing else."""


class SPEError(Exception):
    """An input or setting a user can fix.

    The message is one line: it names the file or value at fault and says what
    to do. The command line prints it to stderr and exits with code 2.
    """
