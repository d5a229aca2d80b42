"""Resume markers: a JSON file that records the settings a piece of work finished (or checkpointed) with. Work
whose marker holds the same settings is not done again; a marker with other settings says what changed.

Used by the pipeline's stages (`.done`), the ablation sweep's points (`point.json`) and fine-tuning checkpoints
(`run_settings.json`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from safeneurons.runtime.outputs import write_json


def as_json(value: Any) -> Any:
    """`value` as JSON reads it back (tuples become lists, paths strings), so saved and current settings compare."""
    return json.loads(json.dumps(value, default=str))


def read_marker(path: Path) -> Any | None:
    """The marker's record, or None when there is none (or it was cut short)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_marker(path: Path, record: Any) -> None:
    write_json(path, record)


def matches(saved: Any, settings: Any) -> bool:
    return saved is not None and as_json(saved) == as_json(settings)


def changed_settings(saved: Mapping[str, Any], settings: Mapping[str, Any], keys: Sequence[str],
                     allowed: Sequence[str] = ()) -> list[str]:
    """The keys whose saved value differs from the current one (except those `allowed` to change)."""
    return [key for key in keys if key not in allowed and as_json(saved.get(key)) != as_json(settings.get(key))]
