"""GELATO benchmarks and the demo (`gelato-demo`): the GSM8K benchmark (`gelato-bench`: emulated
channels, references, plots), the live policy runs, micro benchmarks (KV layouts, edge batching,
controller and round overhead), the trace simulator and tools for GPU runs. Each module's docstring
gives its command; committed results are in `benchmarks/results/`.
"""
