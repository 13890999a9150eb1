"""GELATO edge side: target runtime, verifier, sessions, gRPC server and the `gelato-edge` CLI.

Imports `gelato` only, never `device`.
"""
