"""The generic DP training loop that every recipe plugs into."""
