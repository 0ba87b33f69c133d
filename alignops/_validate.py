"""Checks of scalar arguments: a clear error naming the argument (docs/design.md §5)."""

from __future__ import annotations

import math


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_float(name: str, value, *, lo: float | None = None, hi: float | None = None, lo_open: bool = True,
                allow_none: bool = False) -> float | None:
    """`value` as a finite float with lo < value (lo <= value when not lo_open) and value <= hi."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be a float, got None")
    if not is_number(value):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return value


def check_choice(name: str, value, options):
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def old_keyword_error(fn: str, old: str, new: str) -> TypeError:
    """The error for a keyword that was renamed (docs/glossary.md: one name per concept)."""
    return TypeError(f"{fn}() got the old keyword {old!r}: it is now {new!r} (docs/glossary.md)")


def renamed_keywords(**renames: str):
    """Decorator: calling the function with an old keyword (a key of `renames`) raises a TypeError naming the
    new one (its value). The signature is the function's own (functools.wraps); nothing else changes."""
    import functools  # noqa: PLC0415

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    raise old_keyword_error(fn.__name__, old, new)
            return fn(*args, **kwargs)
        call.renamed_keywords = dict(renames)
        return call
    return wrap
