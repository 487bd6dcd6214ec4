"""The Sheared-LLaMA paper's downstream figures, kept in one place for the report's reference columns.

Source: Xia et al., "Sheared LLaMA: Accelerating Language Model Pre-training via Structured Pruning"
(ICLR 2024), as recorded in the project's fact sheet (``ANCHORS.md``, section 1, "Headline results"):
the average accuracy over the paper's downstream suite (``llmhift.downstream.SUITES["sheared_llama"]``,
lm-evaluation-harness, in percent). The fact sheet gives these averages only, not the per-task numbers
of the paper's table, so no per-task figure is stored here: a number nobody checked against the paper
would be worse than a blank cell. Per-task rows stay blank in the reference columns until someone adds
them from the paper's table itself, citing it.
"""

from __future__ import annotations

__all__ = ["PAPER_AVERAGE"]

# Average accuracy (%) over the paper's whole suite; comparable only with an average over that suite.
# In the report's column order: each pruned model beside the baseline the paper compares it with.
PAPER_AVERAGE: dict[str, float] = {
    "Sheared-LLaMA-1.3B": 51.0,
    "Pythia-1.4B": 48.9,
    "Sheared-LLaMA-2.7B": 56.7,
    "OpenLLaMA-3B-v2": 55.7,
}

