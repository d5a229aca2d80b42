"""Memory sizes: `8GiB`-style options and the units `plan` prints."""
from __future__ import annotations

import re

from safeneurons.errors import SafeneuronsError

GIB = 2 ** 30


MEMORY_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory_size(text: str, option: str) -> int | None:
    """Bytes of a size such as 8GiB, 512MiB, 1.5GB or 1000000; None for auto."""
    if text.strip().lower() == "auto":
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match and MEMORY_UNITS.get(match.group(2).lower())
    if not unit or float(match.group(1)) * unit < 1:
        raise SafeneuronsError(f"{option} {text!r} is not a memory size; expected auto or a positive size such as "
                               f"8GiB, 512MiB or 2GB")
    return int(float(match.group(1)) * unit)
