"""Shared bits of the entry points: every error a user can fix is a message and a documented exit status.

Exit statuses of every entry point (docs/reliability.md):
  0  done
  1  an unexpected error (a bug: the traceback is printed; please report it)
  2  a user error, refused before anything is compiled or written: invalid config or unknown --config field,
     missing data, a workdir of another config, no readable checkpoint, a unit already being trained
  3  the loss became NaN/inf; nothing from the bad steps was saved (the message names the last good step)
  4  stopped by SIGTERM / SIGINT after saving every unit in training; the same command resumes
  5  the workdir cannot be written (read-only, full, no permission); what was on disk is intact

Every command and lab driver calls `run_main(main)` instead of `app.run(main)` (tests/test_structure.py): it parses
the flags with the unknown-field message, and runs main inside `user_errors()`.
"""
from __future__ import annotations

import contextlib
import difflib
import re
import sys
from typing import Callable

from absl import app, flags

from dblocks.assemble import AssemblyError
from dblocks.checkpoint import (CheckpointMismatchError, CheckpointUnreadableError, CheckpointWriteError,
                                UnitBusyError, is_write_error)
from dblocks.config import ConfigError
from dblocks.data import DatasetMissingError
from dblocks.loop import TrainingInterrupted
from dblocks.steps import NonFiniteLossError

EXIT_USER_ERROR, EXIT_NONFINITE, EXIT_INTERRUPTED, EXIT_CANNOT_WRITE = 2, 3, 4, 5

USER_ERRORS = (ConfigError, DatasetMissingError, CheckpointMismatchError, CheckpointUnreadableError, UnitBusyError,
               AssemblyError)


def _fail(message: str, status: int):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


@contextlib.contextmanager
def user_errors():
    """Turns an error the user can act on into a message (no traceback) and its exit status (module docstring)."""
    try:
        yield
    except TrainingInterrupted as e:
        _fail(str(e), EXIT_INTERRUPTED)
    except NonFiniteLossError as e:
        _fail(str(e), EXIT_NONFINITE)
    except USER_ERRORS as e:
        _fail(str(e), EXIT_USER_ERROR)
    except app.UsageError as e:   # a flag combination the flags parser cannot check
        _fail(f"{e}\nPass --help to list the flags.", EXIT_USER_ERROR)
    except CheckpointWriteError as e:
        _fail(e.strerror or str(e), EXIT_CANNOT_WRITE)
    except Exception as e:  # noqa: BLE001 - a refused write, however a library reports it; anything else re-raised
        if not is_write_error(e):
            raise
        what = getattr(e, "filename", None) or "the workdir"
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:400]
        _fail(f"cannot write {what}: {reason}. Free some space or fix the permissions, then rerun the same command "
              f"(the checkpoints already on disk are intact).", EXIT_CANNOT_WRITE)


# -- flags ----------------------------------------------------------------------------------------------------------

def _dotted(c, prefix: str = "") -> list[str]:
    out = []
    for k, v in c.items():
        out.append(prefix + k)
        if hasattr(v, "items"):
            out += _dotted(v, f"{prefix}{k}.")
    return out


def _load_config(flag_name: str, argv: list[str]):
    """The config named by --<flag_name> in argv, loaded the way config_flags loads it (None if not found)."""
    for i, a in enumerate(argv):
        if a.startswith(f"--{flag_name}="):
            path = a.split("=", 1)[1]
        elif a == f"--{flag_name}" and i + 1 < len(argv):
            path = argv[i + 1]
        else:
            continue
        try:
            return flags.FLAGS[flag_name].parser.parse(path)
        except Exception:  # noqa: BLE001 - only used to suggest names
            return None
    return None


def unknown_field_message(argv: list[str]) -> str | None:
    """'unknown field' and the closest names, for the first --config.<path> override of argv the config lacks."""
    for a in argv:
        m = re.match(r"--(\w+)\.([\w.]+)(=|$)", a)
        if not m or m.group(1) not in flags.FLAGS:
            continue
        config = _load_config(m.group(1), argv)
        if config is None:
            continue
        parts, node = m.group(2).split("."), config
        for depth, part in enumerate(parts):
            if hasattr(node, "keys") and part in node:
                node = node[part]
                continue
            where = ".".join(parts[:depth])
            siblings = sorted(node.keys()) if hasattr(node, "keys") else []
            close = difflib.get_close_matches(m.group(2), _dotted(config), n=3, cutoff=0.6)
            close += [f"{where + '.' if where else ''}{s}" for s in difflib.get_close_matches(part, siblings, n=3)]
            close = list(dict.fromkeys(close))
            hint = f" Closest names: {', '.join(close)}." if close else ""
            scope = f"{m.group(1)}.{where}" if where else m.group(1)
            return (f"unknown field --{m.group(1)}.{m.group(2)}: {scope} has no field {part!r}.{hint} "
                    f"Fields of {scope}: {', '.join(siblings) or '(none: it is not a group)'}.")
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with bad flags and unknown --config fields as an 'error:' line and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(f"{e}\nPass --help to list the flags.", EXIT_USER_ERROR)
    except (AttributeError, KeyError) as e:  # config_flags looking up an override the config does not have
        _fail(unknown_field_message(argv) or f"bad --config override: {e}", EXIT_USER_ERROR)


def run_main(main: Callable[[list[str]], None]) -> None:
    """app.run(main) with the flag errors above, and main's user errors as their exit statuses."""
    def wrapped(argv):
        with user_errors():
            return main(argv)
    app.run(wrapped, flags_parser=parse_flags)
