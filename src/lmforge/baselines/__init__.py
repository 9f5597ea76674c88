"""Baselines that the Transformer is measured against, with the same metric (bits per byte)."""
