"""Processes and the command line: supervisor, worker event loop, CLI, client sessions.

For now only the command line exists; `dcluster sim` runs the deterministic simulator.
"""
