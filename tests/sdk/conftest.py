"""Fixtures shared by the sdk tests."""

from __future__ import annotations

import pytest
from edgekit import SigningKey, TrustedKeys


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="module")
def trusted(key: SigningKey) -> TrustedKeys:
    return TrustedKeys([key.public])
