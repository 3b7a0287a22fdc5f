"""Shared pytest configuration."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slurm: starts a real SLURM cluster on this machine (needs root)"
    )
    config.addinivalue_line("markers", "slow: long-running test")
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA GPU (skips without one; bench/gpu_check.sh --run runs them on the GPU machine)"
    )
