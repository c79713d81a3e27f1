"""Package version, recorded in adapter files."""

__version__ = "0.1.0"
