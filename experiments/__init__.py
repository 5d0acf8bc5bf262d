"""Entry points (python -m experiments.<command>) and experiment configs.

Started as `python -m experiments.<command>`, the process first re-executes itself with glibc's malloc on transparent
huge pages (dblocks/hugepages.py: about 100x fewer page faults in XLA's CPU steps; DBLOCKS_HUGEPAGES=0 turns it off).
"""
from dblocks import hugepages as _hugepages

_hugepages.reexec_entry_point()
