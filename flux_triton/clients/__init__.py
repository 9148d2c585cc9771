"""Clients of the served FLUX pipeline (gRPC only)."""
