"""Benchmarks of apt_kernels against peers: python -m benchmarks.run --help."""
