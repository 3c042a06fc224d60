"""DP training engine and recipes."""
