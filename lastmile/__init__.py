"""Lastmile's composition root: settings, the command line, the supervisor."""

__version__ = "0.1.0"
