"""The embedded shapes world: procedural data, a deterministic judge, training and sampling helpers."""
