"""The r grammar as people write it, with no torch import (command-line parsers build fast): text to a
``tome_r`` (:func:`parse_r_text`: command lines, configs, the demo), argparse's type of every ``--r``,
and how tables label an r setting and write token counts."""
from __future__ import annotations

import argparse
import math

TOKENS_HEADER = "tokens (first -> last block)"


def parse_r_text(text: str) -> int | tuple[int, float] | list[int]:
    """An r setting written as text (command lines, configs, the demo) -> ``tome_r``: ``"16"`` -> 16,
    ``"16,-0.5"`` -> ``(16, -0.5)`` (two values whose second has a decimal point, exponent or sign:
    r and inflection), ``"8,8,4,4"`` (or two plain ints, ``"8,4"``) -> ``[8, 8, 4, 4]``, one r per block.
    ``[...]`` forces a list, ``(r, inflection)`` a schedule. ``ValueError`` naming the text and the
    accepted forms otherwise (r below 0 included)."""
    forms = ("use an int r such as 16, 'r,inflection' such as 16,-0.5 (the inflection has a decimal point "
             "or a sign), or a per-layer list such as 8,8,4,4")
    raw = str(text).strip()
    brackets = raw[:1] + raw[-1:]
    force = list if brackets == "[]" else tuple if brackets == "()" else None
    parts = [p.strip() for p in (raw[1:-1] if force else raw).split(",") if p.strip()]
    try:
        if not parts or (force is tuple and len(parts) != 2):
            raise ValueError
        if force is tuple or (force is None and len(parts) == 2 and not parts[1].isdigit()):
            r: int | tuple | list = (int(parts[0]), float(parts[1]))  # "-0.5", "0.5", "+1", "1e-1": an inflection
        elif force is None and len(parts) == 1:
            r = int(parts[0])
        else:
            r = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"not an r setting: {text!r}; {forms}") from None
    counts = [r] if isinstance(r, int) else [r[0]] if isinstance(r, tuple) else r
    if min(counts) < 0:
        raise ValueError(f"r must be >= 0 (tokens merged per block), got {text!r}; {forms}")
    if isinstance(r, tuple) and not math.isfinite(r[1]):
        raise ValueError(f"the inflection must be a finite number, got {text!r}; {forms}")
    return r


def r_to_text(r) -> str:
    """The inverse of :func:`parse_r_text`: ``16`` -> ``"16"``, ``(16, -0.5)`` -> ``"16,-0.5"``, a list
    -> ``"[8,8,4,4]"`` (brackets, so that a two-element list is never read back as a schedule). Used
    where an r setting is stored as text (checkpoint descriptions, cards)."""
    if isinstance(r, tuple):
        return f"{int(r[0])},{float(r[1])!r}"
    if isinstance(r, list):
        return "[" + ",".join(str(int(v)) for v in r) + "]"
    return str(int(r))


def first_r(r) -> int:
    """The r of an r setting's first block as one int (a slider's value): an int as it is, a schedule's
    r, a per-layer list's first entry."""
    return int(r if isinstance(r, int) else r[0])


def r_argument(text: str):
    """argparse type of every ``--r`` option (bench, eval, video, export): :func:`parse_r_text`, its
    ``ValueError`` shown as argparse's one-line error."""
    try:
        return parse_r_text(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def schedule_label(r) -> str:
    """A short label for an r setting, for tables and plots."""
    if isinstance(r, tuple):
        return f"r={r[0]} (inflect {r[1]:+g})"
    if isinstance(r, list):
        return "r=[" + ",".join(map(str, r)) + "]"
    return f"r={r}"


def applied_label(r, tokens_per_layer) -> str:
    """:func:`schedule_label` of ``r``; where a block merged fewer tokens than ``r`` asks (a block merges at
    most half of its unprotected tokens), the r each block applied, from ``ToMeInfo.tokens_per_layer``,
    and the request: ``"r=[32,16,8,4,2,1] (asked r=999, capped)"``."""
    if r is None or not tokens_per_layer or len(tokens_per_layer) < 2:
        return schedule_label(r)
    from visiontools.tome.merge import parse_r

    t = list(tokens_per_layer)
    applied = [a - b for a, b in zip(t, t[1:])]
    if applied == parse_r(len(applied), r):
        return schedule_label(r)
    return f"{schedule_label(applied)} (asked {schedule_label(r)}, capped)"


def token_span(tokens_per_layer) -> str:
    """Token counts as every table writes them (bench, eval, the demo): ``"65 -> 25"``, the tokens
    entering the first block -> the tokens entering the last block, prefix tokens such as the class
    token included, from ``ToMeInfo.tokens_per_layer`` (tokens entering each block, then after the
    last); ``"all"`` for an unpatched model (``None``), which keeps every token."""
    if not tokens_per_layer:
        return "all"
    t = list(tokens_per_layer)
    return f"{t[0]} -> {t[-2] if len(t) > 1 else t[0]}"
