"""The alignment workbench: shared core, the `align` command, the demo, sweeps, reports and benchmarks."""

__version__ = "0.1.0"
