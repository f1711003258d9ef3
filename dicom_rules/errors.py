"""The one error of the rule language."""

from __future__ import annotations


class RuleError(ValueError):
    """A rule document is invalid. The message names the file, line and key."""
