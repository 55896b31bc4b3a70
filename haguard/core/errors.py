"""The root of haguard's error tree.

It lives in the core because the core imports nothing outside haguard/core, and its
errors (a malformed cluster message, ...) belong in the tree too.  haguard/errors.py
re-exports it and draws the whole tree.
"""

from __future__ import annotations


class HaguardError(Exception):
    """Root of every error haguard raises on purpose."""
