"""``tomllib`` on every supported Python: the standard library from 3.11, the ``tomli`` backport on 3.10.

Import it as ``from bench.config.toml import tomllib``; a bare ``import tomllib`` breaks Python 3.10.
"""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pyproject depends on tomli there
    import tomli as tomllib

__all__ = ["tomllib"]
