"""llmhift: Sheared-LLaMA pruning, DoReMi-style dynamic loading and HiFT as MosaicML Composer plugins."""

__version__ = "0.1.0"
