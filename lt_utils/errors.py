"""User-facing errors: one line, the problem and the fix, a non-zero exit, no traceback."""
import functools
import sys


class UserError(Exception):
    """Bad input from the user (flags, paths, files). Printed as one line; exit status 2."""


def require(condition, message):
    if not condition:
        raise UserError(message)


def cli_entry(main):
    """Wrap a script's `main` so a UserError ends the process with one line on stderr and exit 2.

    Anything else is a bug in this project and keeps its traceback.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    def console():
        """An installed command (pyproject's [project.scripts]): exit status 0, whatever `main` returns (the console
        script would print a returned value and exit with status 1)."""
        wrapper()

    wrapper.console = console
    return wrapper
