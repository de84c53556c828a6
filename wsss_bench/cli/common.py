"""Shared CLI plumbing: user errors become one line and exit code 2."""
from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

import click

from ..errors import UserError, describe_os_error


class UserFacingError(click.ClickException):
    """A :class:`UserError` shown as ``Error: <message>`` with exit status 2."""

    exit_code = 2


class WsssGroup(click.Group):
    """A click group that turns user errors raised by any sub-command into clean exits."""

    def invoke(self, ctx: click.Context) -> Any:
        from ..orchestration import runlock

        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise UserFacingError(str(exc)) from None
        except OSError as exc:
            # The file system's limits (a name too long, a full disk, a read-only mount) wherever
            # they strike: one line naming the file; writers are atomic, so nothing is partial.
            raise UserFacingError(describe_os_error(exc)) from None
        except click.UsageError as exc:
            # A bad option value of a sub-command: one line, like every other user error.
            command = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
            raise UserFacingError(f"{command}{exc.format_message()}") from None
        finally:
            runlock.release_all()  # the run folders this command wrote are free again


def setup_logging(quiet: bool = False) -> None:
    """Log to stderr; plugin warnings are shown once, as one line each."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s", force=True)
    warnings.filterwarnings("default")

    def one_line(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                 line: Any = None) -> None:
        print(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = one_line  # type: ignore[assignment]
