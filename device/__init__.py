"""GELATO device side: drafter runtime, draft policies, edge client and the `gelato-device` CLI.

Imports `gelato` only, never `edge`.
"""
