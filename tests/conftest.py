"""Shared fixtures. Helpers that tests import live in tests/helpers.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs more than a minute or network-installed packages; "
                                       "run with -m slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("-m"):
        return
    skip = pytest.mark.skip(reason="slow test: run with `pytest -m slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    from dsunlearn.toy import build_toy_world
    return build_toy_world(str(tmp_path_factory.mktemp("toy_world")), num_docs=16, seed=0)
