"""Checks of the public Python API's arguments.

The rule: every public function checks each argument's type and range before any work and
raises :class:`~quantlab.errors.QuantlabError` naming the argument, what it got and what
would work; a wrong argument never reaches torch, pandas or transformers as a traceback
from deep inside them. (The CLI's argparse and the recipe's pydantic schema do the same for
their entry points.)
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from quantlab.errors import QuantlabError, did_you_mean

#: the dtypes a model is loaded in (a recipe's ``model.dtype``)
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _got(value: Any) -> str:
    if isinstance(value, (int, float)):
        return repr(value)
    return f"{value!r} ({type(value).__name__})"


def count(name: str, value: Any, *, optional: bool = False, minimum: int = 1) -> int | None:
    """An integer ``>= minimum`` (``None`` too when ``optional``); ``True`` is not a count."""
    if value is None and optional:
        return None
    if type(value) is not int and not _is_torch_int(value):
        none = " or None" if optional else ""
        raise QuantlabError(f"{name} must be an integer >= {minimum}{none}, not {_got(value)}")
    if int(value) < minimum:
        raise QuantlabError(f"{name} must be >= {minimum}, not {int(value)}")
    return int(value)


def _is_torch_int(value: Any) -> bool:
    """A numpy or torch integer scalar (what a loop over a tensor's values gives)."""
    return hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0 and "int" in str(value.dtype)


def integer(name: str, value: Any) -> int:
    """Any integer (a seed); ``True`` is not one."""
    if type(value) is not int and not _is_torch_int(value):
        raise QuantlabError(f"{name} must be an integer, not {_got(value)}")
    return int(value)


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise QuantlabError(f"{name} must be True or False, not {_got(value)}")
    return value


def text(name: str, value: Any, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise QuantlabError(
            f"{name} must be a non-empty string{' or None' if optional else ''}, not {_got(value)}"
        )
    return value


def path(name: str, value: Any) -> Path:
    """A path given as ``str`` or ``os.PathLike``."""
    if not isinstance(value, (str, os.PathLike)) or str(value) == "":
        raise QuantlabError(f"{name} must be a path (str or pathlib.Path), not {_got(value)}")
    return Path(value)


def choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise QuantlabError(f"{name} must be one of {', '.join(choices)}, not {_got(value)}{hint}")
    return value


def dtype(value: Any) -> str:
    return choice("dtype", value, DTYPES)


def known_keywords(func: Callable, given: dict[str, Any], what: str) -> None:
    """Every keyword in ``given`` is an optional parameter of ``func``: a misspelt option is
    an error (with the nearest name), never silently dropped."""
    params = [n for n, p in inspect.signature(func).parameters.items() if p.default is not p.empty]
    for key in given:
        if key not in params:
            raise QuantlabError(
                f"{what} has no option '{key}'{did_you_mean(key, params)}; "
                f"its options: {', '.join(params)}"
            )
