"""Fixtures the optim tests opt into with `pytestmark = pytest.mark.usefixtures(...)`
(`one_thread` is in the root conftest)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def float64_default() -> Iterator[None]:
    """Tensors default to float64, so hand computations agree to 1e-10 and better."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
