"""The offline teacher cache (layout and format in :mod:`distill.cache.format`)."""

from distill.cache.reader import CachedTeacher
from distill.cache.writer import write_cache

__all__ = ["CachedTeacher", "write_cache"]
