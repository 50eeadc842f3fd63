"""Shared test hygiene."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Tests that compare processes set torch's thread count to 1 (the same sums in every process);
    restored after each test, since the count changes float rounding, and with it the few
    near-tied P@1 hits the README's numbers include."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
