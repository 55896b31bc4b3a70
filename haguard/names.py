"""Names an operator gives: hosts, clusters, VMs, groups.

A low module of its own (no imports) so that the configuration (config/) and the VM
definitions (vm/) share one pattern without importing each other.  The core keeps its
own copy (`haguard.core.wire.NAME_PATTERN`, the core imports nothing outside itself);
tests/test_wire.py checks that the two agree.
"""

from __future__ import annotations

# Lowercase letters, digits, '_', '.', '-'; starts with a letter or digit; 63 characters at most.
NAME_RE = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
