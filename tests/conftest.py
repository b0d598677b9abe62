import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, 0 when both are zero."""
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom else diff
