"""Speed measurements; run each as `python -m benchmarks.NAME --help`."""
