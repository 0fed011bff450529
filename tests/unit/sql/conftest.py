"""Fixtures for the sql tests: the shipped catalog (functions.yaml) as the classifier sees it."""

from __future__ import annotations

import pytest

from pgguard.policy.loader import load_policy
from pgguard.sql.catalog import Catalog


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_policy(None).catalog
