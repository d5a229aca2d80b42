"""Data sets: readers for the original work's files and common formats, samples built as the original builds them."""
from safeneurons.compat import OLD_HOMES, lazy_exports

__getattr__, __dir__ = lazy_exports(OLD_HOMES["data"])
