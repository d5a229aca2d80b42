"""Read data sets by name or path: the original work's CSV files, JSON/JSONL, plain text, the demo's, and
through `datasets` (hub.py) hub sets, `save_to_disk` folders, parquet and arrow files."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safeneurons.data.examples import DEMO_PREFIX, NAMED_FILES, Example, as_example, clean_prompt, data_dir
from safeneurons.data.hub import BENCHMARKS, Rows, is_datasets_source, load_rows
from safeneurons.errors import SafeneuronsError


def known_names() -> list[str]:
    from safeneurons.data import demo_vocab as demo

    return sorted(NAMED_FILES) + sorted(BENCHMARKS) + [DEMO_PREFIX + name for name in demo.DATASETS]


def resolve_data_path(source: str, directory: str | os.PathLike | None = None) -> Path:
    """The file behind a data set name (in the data directory) or a path; a clear error when neither exists."""
    if source in NAMED_FILES:
        path = data_dir(directory) / NAMED_FILES[source]
        if not path.is_file():
            raise SafeneuronsError(
                f"data set {source!r} needs {NAMED_FILES[source]} in the data directory {path.parent} "
                f"(set --data-dir or SAFENEURONS_DATA; the files come from the data/ folder of "
                f"github.com/boyiwei/alignment-attribution-code)")
        return path
    path = Path(source).expanduser()
    if not path.is_file():
        raise SafeneuronsError(f"data set {source!r} is neither a known name ({', '.join(known_names())}), "
                               f"a hub set (hf:ORG/NAME[:CONFIG][@SPLIT]), a save_to_disk folder nor an existing file")
    return path


def load_examples(source: str, directory: str | os.PathLike | None = None) -> list[Example]:
    """All records of a named data set or file, in file order."""
    if source.startswith(DEMO_PREFIX):
        from safeneurons.data import demo_vocab as demo

        return demo.dataset(source[len(DEMO_PREFIX):])
    if is_datasets_source(source):
        return _examples_of_rows(load_rows(source, directory), source)
    path = resolve_data_path(source, directory)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        examples = _read_csv(path)
    elif suffix in (".jsonl", ".json"):
        examples = _read_json(path)
    else:
        examples = [Example(clean_prompt(line)) for line in _read_text(path).splitlines() if line.strip()]
    if not examples:
        raise SafeneuronsError(f"data file {path} holds no examples")
    return examples


def _read_csv(path: Path) -> list[Example]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise SafeneuronsError(f"data file {path} is not a readable CSV ({str(error).splitlines()[0]})") from None
    if "prompt" not in frame.columns:
        columns = ", ".join(str(column) for column in frame.columns) or "none"
        raise SafeneuronsError(f"CSV {path} has columns [{columns}]; expected prompt,response[,text]")
    responses = frame["response"] if "response" in frame.columns else [None] * len(frame)
    return [as_example(prompt, response) for prompt, response in zip(frame["prompt"], responses)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SafeneuronsError(f"data file {path} is not UTF-8 text (byte {error.start} cannot be decoded): "
                               f"expected CSV, JSONL/JSON or plain text") from None


def _read_json(path: Path) -> list[Example]:
    text = _read_text(path)
    try:
        if path.suffix.lower() == ".json":
            records = json.loads(text)
            records = records if isinstance(records, list) else [records]
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise SafeneuronsError(f"data file {path} is not valid JSON at line {error.lineno}: {error.msg}") from None
    return [_json_record(record, path, index) for index, record in enumerate(records, 1)]


def _examples_of_rows(rows: Rows, source: str) -> list[Example]:
    """Examples from `datasets` records: the named columns, else the standard names as in JSON files."""
    prompt, response = rows.columns.prompt, rows.columns.response
    if prompt is None:
        if response is not None:
            raise SafeneuronsError(f"data set {source!r} names a response column but no prompt column")
        return [_json_record(record, source, index) for index, record in enumerate(rows.records, 1)]
    for column in (prompt, response):
        if column is not None and column not in rows.records[0]:
            raise SafeneuronsError(f"data set {source!r} has no column {column!r}; its columns: "
                                   f"{', '.join(rows.records[0])}")
    return [as_example(_first_turn(record[prompt]), record.get(response) if response else None)
            for record in rows.records]


def _first_turn(value: Any) -> Any:
    """A prompt column of turns (SORRY-Bench's `turns`) gives its first turn."""
    return value[0] if isinstance(value, list) and value else value


def _json_record(record: Any, path: Path | str, index: int) -> Example:
    if not isinstance(record, dict):
        raise SafeneuronsError(f"record {index} of {path} is a {type(record).__name__}; expected an object")
    if "messages" in record:
        messages = list(record["messages"])
        response = messages.pop()["content"] if messages and messages[-1].get("role") == "assistant" else None
        if not messages:
            raise SafeneuronsError(f"record {index} of {path} has no message before the assistant's response")
        return Example(messages[-1]["content"], response, messages=tuple(messages))
    if "prompt" in record:
        return as_example(record["prompt"], record.get("response"))
    if "instruction" in record:
        instruction = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return as_example(instruction, record.get("output"))
    raise SafeneuronsError(f"record {index} of {path} has keys {sorted(record)}; expected prompt/response, "
                           f"instruction/output or messages")


def check_sources(*sources: str | None, directory: str | os.PathLike | None = None) -> None:
    """Read every named data set or file once, so that a bad name or file fails before any model loads."""
    for source in sources:
        if source:
            load_examples(source, directory)
