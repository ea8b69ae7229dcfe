"""The tiny model's trainer (optional: nothing at runtime imports it; it builds its batches
through the runtime backend, so training and inference share one sequence format)."""
