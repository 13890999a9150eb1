"""GELATO shared kernel: configuration, boundary types, sampling math, model loading, wire codec.

`device` and `edge` both import this package and never each other. Nothing here serves models or
runs a gRPC server.
"""

__version__ = "0.1.0"
