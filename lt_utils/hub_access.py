"""Whether the Hub can be reached, answered at once: the Hub libraries' own requests retry for up to a minute before
they give up, so a command that needs the Hub asks here first (HF_HUB_OFFLINE, else one short connection)."""
import contextlib
import socket
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0


def hub_unreachable():
    """Why the Hub cannot be reached now (a few words), or None when it can (or a proxy stands between: then the
    libraries connect through it and say for themselves)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlsplit(constants.ENDPOINT)
    if url.hostname is None:
        return f"HF_ENDPOINT {constants.ENDPOINT} names no host"
    if url.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(url.hostname):
        return None
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        return f"{constants.ENDPOINT} cannot be reached: {err.strerror or err.__class__.__name__}"
    return None


@contextlib.contextmanager
def cache_if_unreachable(name):
    """The block that loads `name`: a Hub id (no such local path) while the Hub cannot be reached runs in offline mode,
    the cache alone, at once. Yields why the Hub is out of reach (for the error message), else None."""
    why = None if Path(str(name)).expanduser().exists() else hub_unreachable()
    with hub_offline() if why else contextlib.nullcontext():
        yield why


@contextlib.contextmanager
def hub_offline():
    """huggingface_hub and datasets in offline mode for the block: their caches only, no request and no retry."""
    import datasets
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
