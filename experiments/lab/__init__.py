"""The lab: research drivers behind the measurements under docs/lab/ (python -m experiments.lab.<driver>).

Not user commands: each one runs a study on the current tree and prints its rows. They follow the commands'
conventions (absl flags, experiments.common.run_main's error messages and exit statuses).
"""
