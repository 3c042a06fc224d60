"""Synthetic note generation."""
