"""Checkpoint files: reading any checkpoint llmhift writes, and the crash-safe run folder."""
