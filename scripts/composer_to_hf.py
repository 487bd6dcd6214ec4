"""Thin wrapper: same arguments as ``python -m llmhift.convert.composer_to_hf``."""

import sys

from llmhift.convert.composer_to_hf import main

if __name__ == "__main__":
    sys.exit(main())
