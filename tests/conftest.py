"""Shared by every test module: the skip of the `onednn_bf16` tests on CPUs without oneDNN bf16, and fixtures.
ldm and `ldm.testing` come from the installed package (`make install` installs the checkout in editable mode)."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked `onednn_bf16` exercise ldm's packed bf16 route, which exists only where oneDNN computes bf16
    (`ldm.accel.cpu.onednn_supports`); elsewhere they skip, naming what the CPU has. Each has a variant that runs on
    every CPU (the plain bf16 route that such CPUs take)."""
    from ldm.accel.cpu import cpu_features, onednn_supports

    if onednn_supports(torch.bfloat16):
        return
    skip = pytest.mark.skip(reason=f"oneDNN bf16 needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT; this CPU: "
                                   f"{cpu_features().describe()}")
    for item in items:
        if "onednn_bf16" in item.keywords:
            item.add_marker(skip)


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
    """The `tiny` preset with seeded random weights (`ldm.testing.reference.random_model`), one per test module.
    Shared by the module's tests: never modify it (tests that need another dtype build their own)."""
    import ldm
    from ldm.testing.reference import random_model

    return random_model(ldm.preset("tiny"))[0]
