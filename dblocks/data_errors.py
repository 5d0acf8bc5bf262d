"""The errors of data a user points dblocks at. Both are user errors: the entry points print their one-line message
and exit with status 2 (experiments/common.py), before anything is compiled or written."""
from __future__ import annotations


class DatasetMissingError(FileNotFoundError):
    """A dataset is not on disk; the message names the command that gets it."""


class DataError(DatasetMissingError):
    """A dataset is on disk but cannot be used as it is (wrong shapes, lengths, dtypes or label ids, a file that is
    not what its name says, over a size limit, unreadable): the message names the file and what to change."""
