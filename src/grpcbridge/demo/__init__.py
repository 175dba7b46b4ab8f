"""Todo example service used by the demo, tests and benchmarks."""
