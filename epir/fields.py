"""Choice fields as ``typing.Literal``: one source for the values a configuration field allows.

A dataclass field annotated ``Literal["a", "b"]`` lists its allowed values once; :func:`literal_problems`
checks an instance against them (``__post_init__`` of :class:`epir.train.TrainRecipe`,
:class:`epir.model.EPIRConfig`), :func:`choices` gives them to argparse and help texts, and the grid's
typed check (pydantic, strict) reads the same annotation.
"""

from __future__ import annotations

import dataclasses
import functools
import typing


@functools.cache
def literal_fields(cls: type) -> dict[str, tuple]:
    """field name -> its allowed values, for every field of dataclass ``cls`` annotated with a ``Literal``."""
    hints = typing.get_type_hints(cls)
    return {f.name: typing.get_args(hints[f.name]) for f in dataclasses.fields(cls)
            if typing.get_origin(hints[f.name]) is typing.Literal}


def choices(cls: type, name: str) -> tuple:
    """The values field ``name`` of dataclass ``cls`` allows.

    Raises:
        KeyError: the field is not a ``Literal`` field.
    """
    return literal_fields(cls)[name]


def literal_problems(obj) -> list[str]:
    """One line per ``Literal`` field of dataclass instance ``obj`` whose value is not allowed:
    ``name='x' is not one of ('a', 'b')``."""
    return [f"{name}={getattr(obj, name)!r} is not one of {allowed}"
            for name, allowed in literal_fields(type(obj)).items() if getattr(obj, name) not in allowed]
