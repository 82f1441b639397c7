"""The library's one default model, named where every layer can import it without torch or timm
(the CLI builds its ``--help`` before importing either). :mod:`visiontools.models` loads it."""
from __future__ import annotations

DEFAULT_CHECKPOINT = "cifar10_cct"  # the shipped checkpoint that eval, video, export and the demo load
DEFAULT_ARCHITECTURE = "cct_vit_cifar"  # its model (random weights if the shipped file is broken)
