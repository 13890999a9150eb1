"""GELATO edge side: per-session verification, the slot-based target KV pool and its batched
forward, the batcher, session admission, metrics, auth, the gRPC server and the `gelato-edge` CLI.

Imports `gelato` only, never `device`.
"""
