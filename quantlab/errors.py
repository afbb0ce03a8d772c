"""Error types. A ``QuantlabError`` is a user mistake or an unmet precondition: the CLI
prints its message on one line and exits with code 2, without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class QuantlabError(Exception):
    """A problem the user can fix (bad recipe, missing file, missing extra...)."""


class RecipeError(QuantlabError):
    """The recipe is malformed or names something that does not exist."""


class MissingDependencyError(QuantlabError):
    """An optional dependency is not installed; the message names the extra."""

    def __init__(self, package: str, extra: str, what: str):
        # the torch pin in the same command: left free, pip may swap the CPU torch for a CUDA build
        super().__init__(
            f"{what} needs the '{package}' package, which is not installed; "
            f"install it with: pip install 'quantlab[{extra}]' torch=={_torch_pin()}"
        )


def _torch_pin() -> str:
    """The installed torch's version (what the project's commands pin), without a local tag."""
    import importlib.metadata

    try:
        return importlib.metadata.version("torch").split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return "2.13.0"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
