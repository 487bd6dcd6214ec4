"""Composer models: the LLaMA-family decoder and a wrapper for any transformers causal LM."""
