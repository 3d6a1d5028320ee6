"""Adapters that hand off particular kinds of state (shipped as ``handoff.adapters``)."""
