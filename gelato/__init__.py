"""GELATO shared kernel, imported by both `device` and `edge` (which never import each other).

Boundary types (`types`) and their protobuf codec (`wire`; generated stubs in `v1`), sampling and
acceptance math (`sampling`, `entropy`), the KV-cached token sequence both sides run (`kv`), model
loading and the tokenizer fingerprint (`models`), gRPC channel options and TLS/token helpers
(`channel`, `security`), time-limited awaits alike on every Python (`deadline`), what both CLIs
share (`cli_common`), and the subpackages `controller` (the policies' pure math), `power` (energy
meters, radio model) and `tiny` (the embedded model pair and its recipe). Nothing here serves
models or runs a gRPC server.
"""

__version__ = "0.1.0"
