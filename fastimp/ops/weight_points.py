"""Placeholder: this op lands with its issue (see docs/ARCHITECTURE.md)."""
