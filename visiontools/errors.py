"""The user-facing error types: mistakes a user makes every day (an unknown model, a bad value, missing
data, a missing optional extra). ``visiontools.cli`` prints them as one line, never as a traceback."""
from __future__ import annotations

import difflib
import importlib
from typing import Iterable

# optional module -> the pyproject extra that installs it
EXTRAS = {"diffusers": "sd", "transformers": "sd", "accelerate": "sd", "tomesd": "bench", "gradio": "demo",
          "onnx": "export", "onnxscript": "export", "onnxruntime": "export", "cv2": "video"}


class UserError(ValueError):
    """A mistake in what the user asked for (a ``ValueError``); the message names the problem and the fix."""


class MissingExtraError(UserError, ModuleNotFoundError):
    """An optional dependency is not installed; the message says which extra installs it."""


def install_hint(module: str) -> str:
    """``"pip install -e '.[sd]'"`` for a module of an optional extra (a plain pip install otherwise)."""
    extra = EXTRAS.get(module.split(".")[0])
    if extra is None:
        return f"pip install {module.split('.')[0]}"
    return f"pip install -e '.[{extra}]' in a clone (or pip install 'visiontools[{extra}]'), or bash scripts/setup.sh"


def missing_extra(module: str, feature: str) -> MissingExtraError:
    """The error for ``feature`` needing the uninstalled ``module``."""
    err = MissingExtraError(f"{feature} needs the optional package {module.split('.')[0]!r}: {install_hint(module)}")
    err.name = module
    return err


def require(module: str, feature: str):
    """Import ``module`` or raise :class:`MissingExtraError` saying which extra provides it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise missing_extra(module, feature) from None
        raise


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'epochs'?)"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
