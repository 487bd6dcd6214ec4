"""Datasets: raw text to packed MDS shards, the embedded demo corpus, and multi-domain streaming."""
