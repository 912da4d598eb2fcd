"""Everything under tests/preflight/ is the ``preflight`` tier (pytest.ini): ``-m preflight`` runs it alone."""
from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).parent == _HERE:
            item.add_marker(pytest.mark.preflight)
