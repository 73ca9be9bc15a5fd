"""The two kinds of failure every command reports, and their exit codes.

``BadInput`` (exit 2): the user asked for something that cannot work — a
missing file, a wrong shape, an unknown option. ``RunFailure`` (exit 1):
the input was fine but the run failed (a NaN loss, out of memory).
The CLI turns both into one line on stderr; the library only raises them.
"""


class DtkError(Exception):
    exit_code = 1
    label = "error"   # the word after "dtk <command>:" on stderr


class BadInput(DtkError):
    exit_code = 2


class RunFailure(DtkError):
    exit_code = 1


class StdoutClosed(BaseException):
    """The reader of stdout went away (``dtk sample ... | head -1``): stop as SIGPIPE stops a Unix tool,
    quietly, with 141 (128 + SIGPIPE); files already finished stay, as after Ctrl-C."""
