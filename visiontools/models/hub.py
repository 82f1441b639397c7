"""Pretrained timm weights from the Hugging Face hub, failing fast when the hub cannot be reached.

timm loads pretrained weights through ``huggingface_hub``, which retries an unreachable hub for about
a minute before it fails with a traceback. :func:`create_pretrained` first checks in a few seconds
whether the hub answers (or whether ``HF_HUB_OFFLINE`` is set); if not, it loads from the local cache
only and, when the weights are not cached, raises a one-line :class:`~visiontools.errors.UserError`.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
from urllib.parse import urlparse

from visiontools.errors import UserError

PROBE_TIMEOUT_S = 3.0


def offline_requested() -> bool:
    """Whether the user switched the hub off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "on", "yes", "true")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub (``HF_ENDPOINT``, default huggingface.co) opens within
    ``timeout`` seconds; name resolution included (run in a thread, since it ignores socket timeouts)."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok and ok[0])


@contextlib.contextmanager
def _local_files_only():
    """huggingface_hub in offline mode for the duration (reads the local cache, no network calls)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # timm without huggingface_hub: nothing to switch
        yield
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def create_pretrained(name: str, **kwargs):
    """``timm.create_model(name, pretrained=True, **kwargs)``; offline or with the hub unreachable, only
    cached weights are used, and missing ones give a one-line error instead of a minute of retries."""
    import timm

    requested = offline_requested()
    if not requested and hub_reachable():
        return timm.create_model(name, pretrained=True, **kwargs)
    try:
        with _local_files_only():
            return timm.create_model(name, pretrained=True, **kwargs)
    except OSError:  # LocalEntryNotFoundError, OfflineModeIsEnabled, URLError: all OSErrors
        why = ("the hub is switched off (HF_HUB_OFFLINE)" if requested else
               f"{urlparse(os.environ.get('HF_ENDPOINT') or 'https://huggingface.co').hostname} is unreachable")
        raise UserError(f"pretrained weights for {name!r} are not in the local cache and {why}: connect to the "
                        "network (or set HF_ENDPOINT to a mirror), or leave out --pretrained to use random "
                        "weights") from None
