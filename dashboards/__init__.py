"""Governance dashboards: Streamlit pages over the DuckDB read model (``dashboards.app``)."""
