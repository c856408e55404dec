"""Shared building blocks of fastpeft's kernels (RNG, helpers)."""
