import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import tiny_target, trained_tiny_head  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pair():
    """(target, head): a tiny random Mixtral and a head fitted to it."""
    target = tiny_target()
    return target, trained_tiny_head(target)
