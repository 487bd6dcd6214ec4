"""The label convention shared by the datasets that write ``labels`` and the models that read them."""

__all__ = ["IGNORE_INDEX"]

IGNORE_INDEX = -100  # a label the loss skips: torch's cross_entropy default and Hugging Face's convention
