"""Moved to ``llmhift.convert.post_pruning``; ``python -m llmhift.utils.post_pruning_processing`` still runs it."""

import sys

from llmhift.convert.post_pruning import *  # noqa: F403
from llmhift.convert.post_pruning import main

if __name__ == "__main__":
    sys.exit(main())
