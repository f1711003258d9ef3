"""Offline training of the reference models (needs the ``train`` extra: torch)."""
