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


def check_number(option: str, value, *, low: float | None = None, above: float | None = None) -> None:
    """A method's numeric option: finite, and at least ``low`` / above ``above`` (None: the method's default).
    Checked when the method is made, before anything loads: a NaN would surface as a NaN loss much later."""
    import math

    if value is None:
        return
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInput(f"{option} {value}: must be a finite number")
    if low is not None and value < low:
        raise BadInput(f"{option} {value:g}: must be at least {low:g}")
    if above is not None and value <= above:
        raise BadInput(f"{option} {value:g}: must be above {above:g}")


class Terminated(BaseException):
    """SIGTERM, acted on at a safe point: the command stops as after Ctrl-C (exit 143), whole files only."""
