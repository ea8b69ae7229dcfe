"""Synthetic video streams with known evidence (for training and measuring tiny models)."""
