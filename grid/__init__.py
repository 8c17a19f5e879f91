"""Experiment grid."""
