"""Entry points (python -m experiments.<command>) and experiment configs.

Started as `python -m experiments.<command>`, the process first re-executes itself with glibc's malloc on transparent
huge pages (dblocks/hugepages.py: XLA's CPU steps fault their temporaries in 512x less often; DBLOCKS_HUGEPAGES=0 off).
"""
from dblocks import hugepages as _hugepages

_hugepages.reexec_entry_point()
