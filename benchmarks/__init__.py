"""GELATO benchmarks and the demo: GSM8K and micro benchmarks, channel emulation, plots."""
