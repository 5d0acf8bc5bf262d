"""Shared bits of the entry points: every error a user can fix is a message and a documented exit status.

Exit statuses of every entry point (docs/reliability.md):
  0  done
  1  an unexpected error (a bug: the traceback is printed; please report it)
  2  a user error, refused before anything is compiled or written: invalid config or unknown --config field,
     missing data, a workdir of another config, no readable checkpoint, a unit already being trained
  3  the loss or the trained state became NaN/inf; nothing from the bad steps was saved (the message names the last
     good step)
  4  stopped by SIGTERM / SIGINT after saving every unit in training (or before its first step); the same command
     resumes
  5  the workdir cannot be written (read-only, full, no permission); what was on disk is intact
  6  out of memory (device or host); what was on disk is intact

Every command and lab driver calls `run_main(main)` instead of `app.run(main)` (tests/test_structure.py): it parses
the flags with the unknown-field message, and runs main inside `user_errors()`.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import re
import sys
from typing import Callable

from absl import app, flags

from dblocks.assemble import AssemblyError
from dblocks.checkpoint import (CheckpointMismatchError, CheckpointUnreadableError, CheckpointWriteError,
                                UnitBusyError, is_out_of_memory, is_write_error)
from dblocks.config import ConfigError
from dblocks.data import DatasetMissingError
from dblocks.loop import TrainingInterrupted
from dblocks.steps import NonFiniteLossError

EXIT_USER_ERROR, EXIT_NONFINITE, EXIT_INTERRUPTED, EXIT_CANNOT_WRITE, EXIT_OUT_OF_MEMORY = 2, 3, 4, 5, 6

USER_ERRORS = (ConfigError, DatasetMissingError, CheckpointMismatchError, CheckpointUnreadableError, UnitBusyError,
               AssemblyError)


def _fail(message: str, status: int):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


@contextlib.contextmanager
def user_errors(workdir: str | None = None):
    """Turns an error the user can act on into a message (no traceback) and its exit status (module docstring).
    A file error outside `workdir` (default: the --workdir flag) is an input the user named (status 2); inside it,
    or a refused write however a library reports it, the workdir cannot be written (status 5)."""
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
    except Exception as e:  # noqa: BLE001 - OOM, a file that cannot be read or written; anything else re-raised
        if is_out_of_memory(e):
            line = (str(e).strip().splitlines() or [type(e).__name__])[0][:400]
            _fail(f"out of memory: {line}. Lower data.batch_size, set --config.model.remat=full, or use a device "
                  f"with more memory; the checkpoints on disk are intact.", EXIT_OUT_OF_MEMORY)
        filename = getattr(e, "filename", None) if isinstance(e, OSError) else None
        if filename and not _in_workdir(str(filename), workdir):   # an input the user named: data, a run to read
            _fail(f"cannot read {filename}: {e.strerror or e}", EXIT_USER_ERROR)
        if not is_write_error(e):
            raise
        what = filename or "the workdir"
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:400]
        _fail(f"cannot write {what}: {reason}. Free some space or fix the permissions, then rerun the same command "
              f"(the checkpoints already on disk are intact).", EXIT_CANNOT_WRITE)


def _in_workdir(path: str, workdir: str | None = None) -> bool:
    """Whether `path` lies in `workdir` (default: the --workdir flag; True when there is none: a write is assumed)."""
    if workdir is None and "workdir" in flags.FLAGS and flags.FLAGS.is_parsed():
        workdir = flags.FLAGS["workdir"].value
    if not workdir:
        return True
    root = os.path.realpath(workdir)
    return os.path.commonpath([root, os.path.realpath(path)]) == root


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
        rest = flags.FLAGS(argv)
    except flags.Error as e:   # a validator of several flags prefixes them all ('flags a=1, b=2: ...'): dropped
        message = str(e).split(": ", 1)[-1] if str(e).startswith("flags ") else str(e)
        _fail(f"{message}\nPass --help to list the flags.", EXIT_USER_ERROR)
    except (AttributeError, KeyError) as e:  # config_flags looking up an override the config does not have
        _fail(unknown_field_message(argv) or f"bad --config override: {e}", EXIT_USER_ERROR)
    except SyntaxError as e:   # a config file that is not Python
        _fail(f"{e.filename}, line {e.lineno}: {e.msg}", EXIT_USER_ERROR)
    for name in list(flags.FLAGS):   # a config file that is missing or fails to load: config_flags defers the error
        flag = flags.FLAGS[name]
        if type(flag).__name__ == "_ConfigFlag" and flag.present:
            try:
                getattr(flag.value, "keys", None)   # a config that failed to load raises on any attribute
            except Exception as e:  # noqa: BLE001 - whatever the file raised while loading
                detail = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                _fail(f"--{name}: cannot load the config file: {' '.join(detail[-2:])[:400]}", EXIT_USER_ERROR)
    return rest


def run_main(main: Callable[[list[str]], None]) -> None:
    """app.run(main) with the flag errors above, and main's user errors as their exit statuses."""
    def wrapped(argv):
        with user_errors():
            return main(argv)
    app.run(wrapped, flags_parser=parse_flags)
