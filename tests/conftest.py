"""Makes `tests/reference.py` (the diffusers/transformers references) importable as `reference` whatever pytest's
import mode, and the repository root importable as `ldm` when the package is not installed."""
import sys
from pathlib import Path

for path in (Path(__file__).parent, Path(__file__).parents[1]):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from more threads, and on a busy machine OpenMP's spinning threads make a 0.03 s
    generation take seconds. Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """The `tiny` preset with seeded random weights (tests/reference.random_model), one per test module. Shared by
    the module's tests: never modify it (tests that need another dtype build their own)."""
    import ldm
    from reference import random_model

    return random_model(ldm.preset("tiny"))[0]
