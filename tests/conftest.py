"""Shared pytest fixtures; the tiny models and their inputs are in :mod:`mmshiftkv.testing`."""

from __future__ import annotations

import pytest

from mmshiftkv.testing import FAMILIES, VISION_FAMILIES


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(params=VISION_FAMILIES)
def vision_family(request) -> str:
    return request.param
