"""Deterministic simulation of a haguard cluster: many agent cores, one seed, checked invariants."""
