"""The library's one default model, named where every layer can import it without torch or timm
(the CLI builds its ``--help`` before importing either). :mod:`visiontools.models` loads it."""
from __future__ import annotations

import json
from pathlib import Path

DEFAULT_CHECKPOINT = "cifar10_cct"  # the shipped checkpoint that eval, video, export and the demo load
DEFAULT_ARCHITECTURE = "cct_vit_cifar"  # its model (random weights if the shipped file is broken)

# The interleaved timing rounds of every command that times (each bench target, eval): one default for all.
REPEATS = 5
WARMUP = 1

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"  # the shipped checkpoints and their cards
FALLBACK_R = "8"  # only if the default card cannot be read: the default's measured choice (1.51x for 0.40 points)


def card_r(card: dict) -> str | None:
    """The r (r grammar text) a checkpoint's description or card recommends: the setting it was trained
    with (``tome``, written by ``visiontools train`` with a ``tome:`` section), else the card's
    ``recommended_r`` (chosen from its measured accuracy and speed table), else None."""
    trained = card.get("tome") or {}
    return trained.get("r") or card.get("recommended_r")


def default_r_text() -> str:
    """The default r of ``eval``, ``video``, ``export`` and the demo when the checkpoint in use recommends
    none: the one the default checkpoint recommends (its card, read without torch)."""
    try:
        card = json.loads((CHECKPOINT_DIR / f"{DEFAULT_CHECKPOINT}.json").read_text())
        return card_r({**card, **card.get("description", {})}) or FALLBACK_R
    except (OSError, ValueError):
        return FALLBACK_R
