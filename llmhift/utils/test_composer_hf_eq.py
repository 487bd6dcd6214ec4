"""Moved to ``llmhift.convert.compare_logits``; ``python -m llmhift.utils.test_composer_hf_eq`` still runs it."""

import sys

from llmhift.convert.compare_logits import *  # noqa: F403
from llmhift.convert.compare_logits import main

if __name__ == "__main__":
    sys.exit(main())
