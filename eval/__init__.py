"""Utility and privacy evaluation of synthetic notes."""
