"""Offline converters: HF <-> Composer checkpoints, the post-pruning processor and the logit check."""
