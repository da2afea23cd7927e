"""Offline at once when the Hub cannot be reached, instead of after a minute of retries.

huggingface_hub retries a failed connection five times with back-off (about 50 s, each retry
logged to stderr) before transformers or datasets fall back on the local cache. One TCP
connect to the endpoint, a few seconds at most, tells the same: where it fails, loads run in
offline mode and read only the cache, and a miss becomes one clear error right away.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

CONNECT_TIMEOUT_S = 3.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_reachable() -> bool:
    """Whether a TCP connection to the Hub endpoint (`HF_ENDPOINT`) opens now; False in offline mode."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return True  # only the proxy knows; let the libraries try
    url = urlsplit(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    opened, done = [], threading.Event()

    def connect() -> None:  # in a thread: the name lookup has no timeout of its own
        with contextlib.suppress(OSError):
            socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
            opened.append(True)
        done.set()

    threading.Thread(target=connect, daemon=True).start()
    return done.wait(CONNECT_TIMEOUT_S) and bool(opened)


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[bool]:
    """Within the block huggingface_hub, transformers and datasets read only the local cache if the
    Hub cannot be reached; yields whether it can."""
    if hub_reachable():
        yield True
        return
    from huggingface_hub import constants

    # Each library reads its own copy of the flag (datasets' is set from the environment at import).
    flags = [(constants, "HF_HUB_OFFLINE")]
    if (config := sys.modules.get("datasets.config")) is not None:
        flags += [(config, name) for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(config, name)]
    saved = [getattr(obj, name) for obj, name in flags]
    for obj, name in flags:
        setattr(obj, name, True)
    try:
        yield False
    finally:
        for (obj, name), value in zip(flags, saved, strict=True):
            setattr(obj, name, value)


def not_cached(what: str) -> str:
    """The tail of the error for a Hub id that is neither cached nor reachable."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE"):
            return f"{what} is not in the local Hub cache and {var} is set; unset it to download"
    return (
        f"{what} is not in the local Hub cache and the Hub ({hub_endpoint()}) cannot be reached; "
        "download it once with network access"
    )
