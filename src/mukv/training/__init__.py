"""The tiny model's trainer (optional: nothing at runtime imports it)."""
