"""Subcommands of the `tvrn` CLI, one module each (see tvrn.cli)."""
