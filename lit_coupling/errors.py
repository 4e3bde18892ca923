"""The exception types the command line shows as a message instead of a traceback, and the setting checks that
raise them.

Every options dataclass checks its own fields with these helpers in a `validate()` next to the fields, so a
setting's type and range are stated where it is declared, and a bad value is refused before any work starts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any


class UserError(Exception):
    """A problem with the user's input or set-up (a file, a record, a model, a flag); the message says how to fix it.

    Data errors name the file, the record and the field. Anything else that escapes is a bug and keeps its traceback.
    """


class SettingError(UserError, ValueError):
    """A setting (a command-line flag or a key of a --config YAML) with a value of the wrong type or range."""


def _flag(name: str) -> str:
    return name if name.startswith("--") else f"--{name}"


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def bad_setting(name: str, value: Any, expected: str, hint: str = "") -> SettingError:
    """`--name value` is refused: what was expected and, when there is more to say than that, what to do."""
    hint = hint[:1].upper() + hint[1:]
    return SettingError(f"{_flag(name)} {_shown(value)}: expected {expected}" + (f". {hint}" if hint else ""))


def check_int(
    name: str,
    value: Any,
    minimum: int | None = None,
    maximum: int | None = None,
    optional: bool = False,
    hint: str = "",
) -> None:
    """An integer (not a bool, not a float) in [minimum, maximum]; None allowed when `optional`."""
    if value is None and optional:
        return
    bounds = _bounds(minimum, maximum)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_setting(name, value, f"an integer{bounds}", hint)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise bad_setting(name, value, f"an integer{bounds}", hint)


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
    hint: str = "",
) -> None:
    """A finite number in the interval low..high (each end open or closed); None allowed when `optional`."""
    if value is None and optional:
        return
    left, right = ("(" if low_open else "["), (")" if high_open else "]")
    interval = (
        f" in {left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        if low is not None or high is not None
        else ""
    )
    expected = f"a finite number{interval}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_setting(name, value, expected, hint)
    if low is not None and (value < low or (low_open and value == low)):
        raise bad_setting(name, value, expected, hint)
    if high is not None and (value > high or (high_open and value == high)):
        raise bad_setting(name, value, expected, hint)


def check_choice(name: str, value: Any, choices: Iterable[str], hint: str = "") -> None:
    choices = tuple(choices)
    if value not in choices:
        raise bad_setting(name, value, "one of " + ", ".join(choices), hint)


def check_text(name: str, value: Any, optional: bool = True) -> None:
    """A non-empty string (a path, a name); None allowed when `optional`."""
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        raise bad_setting(name, value, "a non-empty string" + (" (or leave it unset)" if optional else ""))


_LAYER_PART = re.compile(r"(-?\d+)(?:-(-?\d+))?")


def check_layer_spec(name: str, spec: Any) -> None:
    """The syntax of a layer setting ('all', '4-8', '4,6,8', an int or a list of ints), before the model is known.

    A range must run upwards ('8-4' is refused, not read as an empty set); whether the layers exist is checked
    against the model's layer count once its config is read (`lit_coupling.models.adapters.parse_layers`).
    """
    if spec is None or spec == "all":
        return
    usage = "'all', a range '4-8' (first ≤ last), a list '4,6,8', or a mix '0-3,8'"
    if isinstance(spec, bool):
        raise bad_setting(name, spec, usage)
    if isinstance(spec, int):
        return
    if isinstance(spec, (list, tuple)):
        if not spec or not all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
            raise bad_setting(name, spec, usage)
        return
    if not isinstance(spec, str) or not spec.strip():
        raise bad_setting(name, spec, usage)
    for part in spec.replace(" ", "").split(","):
        m = _LAYER_PART.fullmatch(part)
        if not m:
            raise bad_setting(name, spec, usage, f"{part!r} is not a layer number or range")
        if m.group(2) is not None:
            lo, hi = int(m.group(1)), int(m.group(2))
            if (lo < 0) == (hi < 0) and lo > hi:
                raise bad_setting(name, spec, usage, f"the range {part!r} runs backwards: write {hi}-{lo}")


def _bounds(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" ≥ {minimum}"
    if maximum is not None:
        return f" ≤ {maximum}"
    return ""
