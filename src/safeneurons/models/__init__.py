"""Models: loading (folders, HF ids, aliases, the demo) and the decoder structure every stage works on."""
from safeneurons.compat import OLD_HOMES, lazy_exports

__getattr__, __dir__ = lazy_exports(OLD_HOMES["models"])
