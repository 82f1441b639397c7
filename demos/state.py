"""State the demo's app and tabs share: the process-wide model cache, the path inside an upload, and
the page's shared components (:class:`Shared`). Tabs import this module, never ``demos.app``.

The tab interface: each tab module (``merge_tab``, ``speed_tab``, ``sd_tab``, ``hyena_tab``,
``video_tab``; composed in this order by :func:`visiontools.demos.app.build_demo`) has

- ``TITLE``: the tab's label;
- ``available() -> bool``: whether its optional packages are installed (cheap: nothing heavy imported);
- ``build_tab(gr, shared: Shared) -> None``: opens ``gr.Tab(TITLE)`` and builds its components and
  events, reading the shared components it needs (and, for the merge tab, filling in the ones it owns);
- optionally ``MISSING``: markdown the app shows in the tab's place when it is not available.

Nothing here imports torch or gradio at import time (``visiontools --help`` stays fast).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

_CACHE = None  # the process-wide visiontools.demos.model_cache.ModelCache
_LOCK = threading.Lock()


def cache():
    """The process-wide :class:`~visiontools.demos.model_cache.ModelCache` (created on first use with
    the default settings, or set by ``visiontools demo`` through :func:`set_cache`)."""
    global _CACHE
    with _LOCK:
        if _CACHE is None:
            from visiontools.demos.model_cache import ModelCache

            _CACHE = ModelCache()
        return _CACHE


def set_cache(model_cache) -> None:
    """Use ``model_cache`` (e.g. with downloads off, or another start-up model) from now on."""
    global _CACHE
    with _LOCK:
        _CACHE = model_cache


def upload_path(value) -> str | None:
    """The file path inside an image or video component's raw value. Events run with
    ``preprocess=False``, so uploads reach :func:`visiontools.demos.images.read_image` undecoded and a
    bad file gets its own clear message instead of a generic processing error."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("path")
    return getattr(value, "path", None)


@dataclass
class Shared:
    """The components tabs share. The app fills in the page-wide ones (``demo``, the start-up model
    ``dm``, the ``model_name`` dropdown, the ``model_info`` panel, ``status``); the merge tab, built
    first, adds the input ``image`` and the ``r`` and ``schedule`` controls the later tabs reuse."""

    demo: Any = None
    dm: Any = None          # the start-up DemoModel
    model_name: Any = None
    model_info: Any = None
    status: Any = None
    image: Any = None
    r: Any = None
    schedule: Any = None
