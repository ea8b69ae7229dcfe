"""Streaming benchmark harness: datasets, resumable runner, judges, metrics, reports."""
