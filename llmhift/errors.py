"""Errors a user fixes, shared by every layer: each prints as one ``error:`` line, never a traceback."""

from __future__ import annotations

import functools
import sys
from typing import Callable, ParamSpec

__all__ = ["UserError", "ConfigError", "cli_errors"]

P = ParamSpec("P")


class UserError(Exception):
    """A problem the user fixes (a path, a key, a value), named in the message with the fix. Each layer
    derives its own (ConfigError, ConversionError, OutputError, ...); every llmhift command prints any of
    them through :func:`cli_errors`."""


class ConfigError(UserError, ValueError):
    """A yaml or override that cannot run; the message starts with the offending key."""


def cli_errors(*kinds: type[Exception]) -> Callable[[Callable[P, int]], Callable[P, int]]:
    """Decorates a command's ``main``: a :class:`UserError`, or one of ``kinds`` (``OSError`` for a file
    that is missing or unreadable, ...), becomes ``error: <message>`` on stderr and exit status 2, the
    status argparse gives a bad argument.

    Example:
        >>> @cli_errors(OSError)
        ... def main(argv=None) -> int:
        ...     raise FileNotFoundError("no such file: run.yaml")
        >>> main()
        2
    """
    def decorate(main: Callable[P, int]) -> Callable[P, int]:
        @functools.wraps(main)
        def run(*args: P.args, **kwargs: P.kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except (UserError, *kinds) as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
        return run
    return decorate
