"""Utilities: FLOPs counting, devices, logging."""
