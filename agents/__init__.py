"""Agents of the mesh: one module per kind, plus the runtime they all share."""
