"""Mask files (bool tensors named like the parameters), their bit-packed and ranged views, applying them."""
from safeneurons.compat import OLD_HOMES, lazy_exports

__getattr__, __dir__ = lazy_exports(OLD_HOMES["masks"] + ("masks.bits", "masks.source", "masks.apply"))
