"""GELATO device side: drafter runtime, draft policies, the round loop, per-round energy
accounting, the edge client and the `gelato-device` CLI.

Imports `gelato` only, never `edge`.
"""
