"""Typed configuration values (pure): ``--set KEY=VALUE`` read as JSON, and every value checked against its field's
type in strict mode (pydantic where installed; the same rules without it, for the GPU machine), so that a wrong
value is refused with a clear line before any work starts, never coerced."""

from __future__ import annotations

import dataclasses
import json
from typing import Literal, get_args, get_origin, get_type_hints

from epir.presets import FAMILIES, PRESETS
from epir.train import TrainRecipe


def field_types(presets: list[str]) -> dict[str, list]:
    """field name -> the types it has in TrainRecipe and in the chosen presets' model configs."""
    out: dict[str, list] = {}
    classes = [TrainRecipe] + [FAMILIES[f].config for f in sorted({PRESETS[p].family for p in presets})]
    for cls in classes:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, []).append(hints[f.name])
    return out


def check_values(values: dict, presets: list[str]) -> list[str]:
    """One line for each value its field's type refuses, checked by pydantic in strict mode (a boolean must
    be true/false, not the text 'False'; an integer may not be 2.5; a float may be an integer).

    Args:
        values: field -> value (``--set``, the TOML's ``[overrides]``, an ``--overrides`` file).
        presets: the chosen presets (their model families' fields count).

    Returns:
        The problems, one line each, empty when every value fits (unknown fields are not judged here).
    """
    if not values:
        return []
    types = field_types(presets)
    problems = []
    for k, v in values.items():
        for t in types.get(k, []):
            why = _refusal(t, v)
            if why:
                want = (f"one of {', '.join(map(repr, get_args(t)))}" if get_origin(t) is Literal
                        else getattr(t, "__name__", str(t)))
                problems.append(f"{k}={v!r} ({type(v).__name__}): {why} ({k} is {want})")
                break
    return problems


def _refusal(t, v) -> str | None:
    """Why pydantic (strict mode) refuses value v for type t, or None. Without pydantic (a lent GPU machine has
    only PyTorch and NumPy) the same strict rules for the types configurations use: bool, int, float (an int
    is a float), str, None, ``Literal`` and unions of them."""
    try:
        from pydantic import TypeAdapter, ValidationError  # deferred: only when values are given
    except ImportError:
        return _strict_refusal(t, v)
    try:
        TypeAdapter(t).validate_python(v, strict=True)
    except ValidationError as e:
        return e.errors()[0]["msg"].lower()
    return None


def _strict_refusal(t, v) -> str | None:
    """:func:`_refusal` without pydantic."""
    if get_origin(t) is Literal:
        return None if v in get_args(t) else f"input should be {' or '.join(map(repr, get_args(t)))}"
    if get_args(t) and type(None) in get_args(t):  # X | None
        return None if v is None else _strict_refusal(next(a for a in get_args(t) if a is not type(None)), v)
    ok = {bool: isinstance(v, bool), int: isinstance(v, int) and not isinstance(v, bool),
          float: isinstance(v, (int, float)) and not isinstance(v, bool), str: isinstance(v, str)}.get(t, True)
    return None if ok else f"input should be a valid {getattr(t, '__name__', t)}"


def parse_overrides(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items -> ``{KEY: VALUE}``; VALUE is read as JSON (``5``, ``1e-3``, ``true``),
    else kept as text (``schedule=cosine``).

    Raises:
        ValueError: for an item without ``=``.
    """
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[k.strip()] = json.loads(v.strip())
        except json.JSONDecodeError:
            out[k.strip()] = v.strip()
    return out


