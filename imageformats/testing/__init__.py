"""Deterministic test devices: sparse_random (a VM-disk-shaped generator and verifying
target) and evil (fault injection over any device)."""
