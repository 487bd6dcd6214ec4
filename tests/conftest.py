"""Session-wide fixtures: the embedded demo corpus and tokenizer are built once per ``make test``."""

from pathlib import Path

import pytest

from llmhift.datasets.demo_data import ensure_demo_data


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The demo data every test trains on; tests read it and never write inside it."""
    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "data")
