"""Subcommands added by the benchmark layer (bench, report, shell)."""
REGISTER: list = []
