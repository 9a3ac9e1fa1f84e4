"""User-facing errors: one line, the problem and the fix, a non-zero exit, no traceback."""
import functools
import os
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
            check_launch_world_size(os.environ)
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {redact(str(err))}", file=sys.stderr)
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


# where a launcher puts the world size: torchrun, then the MPI flavours accelerate also reads
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def check_launch_world_size(env):
    """accelerate's one-process launcher (the path of --cpu, and of a config without a distributed type) sets
    ACCELERATE_USE_CPU always, and MASTER_ADDR/MASTER_PORT only when the config asks for several processes or
    machines, yet starts this process alone and gives it no world size: it would train at a fraction of the global
    batch, or as independent runs writing into one folder. Refuse before any work."""
    if "ACCELERATE_USE_CPU" not in env or not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        return
    if any(env.get(name) for name in WORLD_SIZE_VARS):
        return
    raise UserError(f"`accelerate launch` started this process alone, but set up a rendezvous at {env['MASTER_ADDR']}:"
                    f"{env['MASTER_PORT']} because its config asks for several processes or machines (--cpu and "
                    "distributed_type NO start one); drop --cpu (without a GPU the multi-GPU and DeepSpeed configs "
                    "start their processes on CPU), or pass --num_processes 1 --num_machines 1 for one process "
                    "(or unset MASTER_ADDR/MASTER_PORT if your shell set them)")
