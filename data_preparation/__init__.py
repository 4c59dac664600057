"""Embedded benchmark generator, real-folder importer, per-site splitter and counts."""
