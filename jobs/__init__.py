"""Thin entry points run by `python -m jobs.<name>` or `ray job submit`."""
