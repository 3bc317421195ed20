"""Triton kernels, one module per op (nothing but kernels and their launch helpers)."""
