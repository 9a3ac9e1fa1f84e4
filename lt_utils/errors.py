"""User-facing errors: one line, the problem and the fix, a non-zero exit, no traceback."""
import functools
import re
import sys

# a Hugging Face token typed where a flag name or value was expected (`--hub-token hf_...`) must not reach job logs
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{8,}")


def redact(text):
    """`text` with every Hugging Face token replaced by `hf_<hidden>`."""
    return _HF_TOKEN.sub("hf_<hidden>", text)


class UserError(Exception):
    """Bad input from the user (flags, paths, files). Printed as one line; exit status 2."""


def require(condition, message):
    if not condition:
        raise UserError(message)


def cli_entry(main):
    """Wrap a script's `main` so a UserError ends the process with one line on stderr and exit 2 (tokens hidden).

    Anything else is a bug in this project and keeps its traceback.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {redact(str(err))}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
