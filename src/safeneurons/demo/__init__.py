"""The built-in demo: a base model and its chat model made the way real chat models are, and the demo judge."""
from safeneurons.compat import OLD_HOMES, lazy_exports

__getattr__, __dir__ = lazy_exports(OLD_HOMES["demo"])
