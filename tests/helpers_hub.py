"""The Hub as the up-front checks of --push_to_hub see it, without the network: a listening local endpoint (one
connection succeeds) and a token, set where huggingface_hub reads them."""
import contextlib
import socket

from huggingface_hub import constants


@contextlib.contextmanager
def reachable_hub(monkeypatch, token_dir):
    """HF_ENDPOINT a local listening socket, online (entry scripts run by run_cli also need ONLINE in their env),
    HF_TOKEN set, and no token file of this machine read instead."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_dir / "no-token"))
        monkeypatch.setenv("HF_TOKEN", "hf_test")
        yield


ONLINE = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}  # run_cli sets them where the libraries read them


def closed_port():
    """A local port nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
