"""Shared bits of the entry points: clean error exits for the errors a user can fix."""
from __future__ import annotations

import contextlib
import sys

from dblocks.assemble import AssemblyError
from dblocks.checkpoint import CheckpointMismatchError
from dblocks.config import ConfigError
from dblocks.data import DatasetMissingError

USER_ERRORS = (ConfigError, DatasetMissingError, CheckpointMismatchError, AssemblyError)


@contextlib.contextmanager
def user_errors():
    """Turns a user-fixable error into a message and exit status 2, without a traceback."""
    try:
        yield
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
