"""Projections: pure folds of the event log into DuckDB read models, the projector that
keeps them current, and the metric queries the governance board reads.

Imports only ``events`` among Lastmile's packages. See ``projections/README.md``.
"""
