"""EPIR model library."""
