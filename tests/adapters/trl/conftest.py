"""Fixtures of the TRL adapter tests: the adapter module, the shipped example, its tiny policy on disk."""

from __future__ import annotations

import pytest

from tests.adapters.conftest import require_framework
from tests.adapters.trl.helpers import load_example


@pytest.fixture(scope="module")
def adapter():
    require_framework("trl")
    import flowloss.adapters.trl as module

    return module


@pytest.fixture(scope="module")
def example(adapter):
    """``examples/trl_flowrl.py``: the tiny Qwen2 builder, the toy reward, the config the tests start from."""
    return load_example()


@pytest.fixture(scope="module")
def policy_dir(example, tmp_path_factory):
    return example.build_tiny_policy(str(tmp_path_factory.mktemp("tiny-policy")))
