"""What every process entry point shares: settings from the environment (a bad or missing
variable stops the process with one line that names it, not a pydantic dump and a traceback),
and command lines whose `--help` shows every default and whose `--version` answers."""

from __future__ import annotations

import argparse
from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

__all__ = ["settings_error", "settings_from_env", "show_defaults", "version"]

S = TypeVar("S", bound=BaseSettings)


def settings_error(cls: type[BaseSettings], exc: ValidationError) -> str:
    """One line: each offending environment variable, what is wrong, what it is for."""
    prefix = cls.model_config.get("env_prefix", "")
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        info = cls.model_fields.get(field)
        purpose = f" ({info.description})" if info is not None and info.description else ""
        what = "not set" if error["type"] == "missing" else error["msg"].lower()
        problems.append(f"{prefix}{field}".upper() + f": {what}{purpose}")
    return f"{cls.__name__}: " + "; ".join(problems)


def settings_from_env(cls: type[S]) -> S:
    """`cls()` read from the environment; on a bad environment, exit with one line.

    Raises
    ------
    SystemExit
        With `settings_error`'s line as its message (printed to stderr, exit code 1).
    """
    try:
        return cls()
    except ValidationError as exc:
        raise SystemExit(settings_error(cls, exc)) from None


def version(prog: str) -> str:
    """`prog <version of the installed pe-cbir distribution>`, for ``--version``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return f"{prog} {installed('pe-cbir')}"
    except PackageNotFoundError:
        return f"{prog} (not installed)"


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Make `parser`'s help (and every sub-command's) show each option's default.

    An option with a default other than None/False gets "(default: …)" after its help, unless
    its help already speaks of its default; one without help gets just that.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)
            continue
        default = action.default
        if default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            continue
        if action.help == argparse.SUPPRESS or "default" in (action.help or "").lower():
            continue
        action.help = (
            f"{action.help} (default: %(default)s)" if action.help else ("(default: %(default)s)")
        )
