"""pytest-benchmark suites: DP step (CPU, GPU) and kernels. See benchmarks/RESULTS.md."""
