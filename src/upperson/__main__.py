"""``python -m upperson``."""

from upperson.cli import entry_point

entry_point()
