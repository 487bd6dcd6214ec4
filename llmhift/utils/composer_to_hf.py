"""Moved to ``llmhift.convert.composer_to_hf``; ``python -m llmhift.utils.composer_to_hf`` still runs it."""

import sys

from llmhift.convert.composer_to_hf import *  # noqa: F403
from llmhift.convert.composer_to_hf import main

if __name__ == "__main__":
    sys.exit(main())
