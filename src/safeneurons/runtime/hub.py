"""The Hugging Face hub seen from this machine: is it reachable, is offline mode asked for, and offline loading."""
from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator
from urllib.parse import urlparse

HUB_PROBE_SECONDS = 5.0


def offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached (one TCP connect to its endpoint), or None when it can or a proxy is set
    (then the hub client's own attempt decides). Without it an offline machine waits ~30 s of retries."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    try:
        socket.create_connection((host, endpoint.port or (443 if endpoint.scheme == "https" else 80)),
                                 timeout=HUB_PROBE_SECONDS).close()
    except OSError as error:
        return f"the hub at {constants.ENDPOINT} cannot be reached ({error.strerror or type(error).__name__})"
    return None


@contextlib.contextmanager
def offline_mode() -> Iterator[None]:
    """`datasets` and the hub client in offline mode for the block: a cached data set loads at once instead of
    after the client's retries (both libraries read the flag at call time, not only at import)."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
