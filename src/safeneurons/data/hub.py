"""Data sets through the `datasets` library: hub ids (`hf:ORG/NAME[:CONFIG][@SPLIT]`), folders written by
`save_to_disk` (`DIR[@SPLIT]`), parquet and arrow files, and the field's benchmarks by name with their columns
mapped. Any of them may name its columns after `#` (`hf:ORG/NAME#prompt=goal,response=target`).

A hub set loads from the `datasets` cache when the hub cannot be reached (or HF_HUB_OFFLINE is set); a benchmark
name also finds a local copy in the data directory (`DATA_DIR/NAME/` from `save_to_disk`, or `NAME.parquet`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safeneurons.data.examples import data_dir
from safeneurons.errors import SafeneuronsError
from safeneurons.runtime.hub import hub_unreachable, offline_mode, offline_requested

HUB_PREFIX = "hf:"
COLUMNS_MARK = "#"
FILE_SUFFIXES = (".parquet", ".arrow")
DEFAULT_SPLIT = "train"


@dataclass(frozen=True)
class Columns:
    """Which columns hold the prompt and the response; None = found by the standard names (prompt/response,
    instruction/input/output, messages)."""

    prompt: str | None = None
    response: str | None = None


@dataclass(frozen=True)
class Benchmark:
    """A data set the field reports on: where it lives on the hub and which of its columns is the prompt."""

    repo: str
    split: str
    columns: Columns
    config: str | None = None
    about: str = ""

    @property
    def spec(self) -> str:
        return f"{HUB_PREFIX}{self.repo}" + (f":{self.config}" if self.config else "") + f"@{self.split}"


# The hub copies in use today (checked 2026-12): the authors' own where they publish one (JailbreakBench, XSTest,
# SORRY-Bench), else the copies the field loads (walledai's for AdvBench, HarmBench and StrongREJECT, whose authors
# publish CSV files on GitHub; yahma's cleaned Alpaca).
BENCHMARKS = {
    "advbench-hub": Benchmark("walledai/AdvBench", "train", Columns("prompt"),
                              about="AdvBench harmful behaviours (Zou et al. 2023), 520 prompts; `target` is the "
                                    "attack's target prefix, not a response"),
    "harmbench": Benchmark("walledai/HarmBench", "train", Columns("prompt"), "standard",
                           about="HarmBench standard behaviours (Mazeika et al. 2024), 200 prompts"),
    "jailbreakbench": Benchmark("JailbreakBench/JBB-Behaviors", "harmful", Columns("Goal"), "behaviors",
                                about="JBB-Behaviors harmful (Chao et al. 2024), 100 prompts"),
    "jailbreakbench-benign": Benchmark("JailbreakBench/JBB-Behaviors", "benign", Columns("Goal"), "behaviors",
                                       about="JBB-Behaviors benign counterparts, 100 prompts"),
    "strongreject": Benchmark("walledai/StrongREJECT", "train", Columns("prompt"),
                              about="StrongREJECT forbidden prompts (Souly et al. 2024), 313 prompts"),
    "xstest": Benchmark("Paul/XSTest", "train", Columns("prompt"),
                        about="XSTest (Röttger et al. 2024), 250 safe and 200 unsafe prompts; columns type, label"),
    "sorry-bench": Benchmark("sorry-bench/sorry-bench-202406", "train", Columns("turns"),
                             about="SORRY-Bench (Xie et al. 2024), 450 base requests and their 20 mutations "
                                   "(column prompt_style); gated: accept its terms on the hub first"),
    "alpaca-cleaned": Benchmark("yahma/alpaca-cleaned", "train", Columns(),
                                about="Alpaca-cleaned, 51,760 instruction/input/output records"),
}


@dataclass(frozen=True)
class Rows:
    """The records of a data set, with the columns it names (or None for the standard names)."""

    records: list[dict[str, Any]]
    columns: Columns
    name: str


def split_columns(source: str) -> tuple[str, Columns | None]:
    """`SOURCE#prompt=COL,response=COL` as (SOURCE, Columns); (source, None) when it names none."""
    base, mark, named = source.partition(COLUMNS_MARK)
    if not mark:
        return source, None
    values: dict[str, str] = {}
    for item in named.split(","):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or key not in ("prompt", "response") or not value:
            raise SafeneuronsError(f"data set {source!r}: {item!r} after '#' is not prompt=COLUMN or "
                                   f"response=COLUMN")
        values[key] = value
    return base, Columns(values.get("prompt"), values.get("response"))


def split_source_list(text: str) -> list[str]:
    """A comma-separated list of data sets, where a source's `#prompt=…,response=…` keeps its own commas."""
    sources: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if sources and COLUMNS_MARK in sources[-1] and item.startswith(("prompt=", "response=")):
            sources[-1] += "," + item
        elif item:
            sources.append(item)
    return sources


def with_columns(source: str, prompt: str | None, response: str | None) -> str:
    """`source` naming the given columns, unless it names its own or is no `datasets` source."""
    if (prompt is None and response is None) or COLUMNS_MARK in source or not is_datasets_source(source):
        return source
    named = [f"{key}={value}" for key, value in (("prompt", prompt), ("response", response)) if value]
    return source + COLUMNS_MARK + ",".join(named)


def is_datasets_source(source: str) -> bool:
    base, _ = split_columns(source)
    return (base.startswith(HUB_PREFIX) or base in BENCHMARKS or base.lower().endswith(FILE_SUFFIXES)
            or _datasets_folder(base) is not None)


def load_rows(source: str, directory: str | os.PathLike | None = None) -> Rows:
    """The records of a hub set, benchmark name, `save_to_disk` folder or parquet/arrow file."""
    base, columns = split_columns(source)
    if base in BENCHMARKS:
        benchmark = BENCHMARKS[base]
        dataset = _local_copy(base, benchmark.split, directory)
        if dataset is None:
            dataset = _from_hub(benchmark.repo, benchmark.config, benchmark.split, source, directory)
        return Rows(_records(dataset, source), columns or benchmark.columns, base)
    if base.startswith(HUB_PREFIX):
        repo, config, split = parse_hub_id(base)
        dataset = _from_hub(repo, config, split, source, directory)
    elif base.lower().endswith(FILE_SUFFIXES):
        dataset = _from_file(Path(base).expanduser(), source)
    else:
        dataset = _from_folder(base, source)
    return Rows(_records(dataset, source), columns or Columns(), base)


def parse_hub_id(base: str) -> tuple[str, str | None, str]:
    """`hf:ORG/NAME[:CONFIG][@SPLIT]` as (repo, config, split)."""
    rest, _, split = base[len(HUB_PREFIX):].partition("@")
    repo, _, config = rest.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise SafeneuronsError(f"data set {base!r}: expected hf:ORG/NAME[:CONFIG][@SPLIT]")
    return repo, config or None, split or DEFAULT_SPLIT


def _records(dataset: Any, source: str) -> list[dict[str, Any]]:
    records = dataset.to_list()
    if not records:
        raise SafeneuronsError(f"data set {source!r} holds no records")
    return records


def _local_copy(name: str, split: str, directory: str | os.PathLike | None) -> Any | None:
    folder, file = data_dir(directory) / name, data_dir(directory) / f"{name}.parquet"
    if _datasets_folder(str(folder)) is not None:
        return _from_folder(str(folder), name, split)
    return _from_file(file, name) if file.is_file() else None


def _datasets() -> Any:
    """The `datasets` module, its progress bars off: these loads take a moment, and bars would clutter the log."""
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _from_hub(repo: str, config: str | None, split: str, source: str, directory: str | os.PathLike | None) -> Any:
    datasets = _datasets()
    unreachable = "HF_HUB_OFFLINE is set" if offline_requested() else hub_unreachable()
    try:
        if unreachable:
            with offline_mode():
                return datasets.load_dataset(repo, config, split=split)
        return datasets.load_dataset(repo, config, split=split)
    except (OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        where = f"{unreachable}, and it is not in the datasets cache" if unreachable else first_line
        raise SafeneuronsError(
            f"data set {source!r} ({repo}{':' + config if config else ''}, split {split}) cannot be loaded: {where}; "
            f"load it once where there is network (datasets.load_dataset({repo!r}"
            f"{', ' + repr(config) if config else ''})) with HF_HOME pointing at the cache this machine reads, or "
            f"save_to_disk a local copy and pass its folder"
            + (f" (or put it in the data directory, --data-dir, as {data_dir(directory) / source})"
               if source in BENCHMARKS else "")
            ) from None


def _from_file(path: Path, source: str) -> Any:
    datasets = _datasets()
    if not path.is_file():
        raise SafeneuronsError(f"data file {path} (of data set {source!r}) does not exist")
    try:
        if path.suffix.lower() == ".parquet":
            return datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
        return datasets.Dataset.from_file(str(path), in_memory=True)
    except Exception as error:  # pyarrow raises its own types for a damaged file
        raise SafeneuronsError(f"data file {path} is not a readable {path.suffix[1:]} file "
                               f"({(str(error).splitlines() or [type(error).__name__])[0]})") from None


def _datasets_folder(base: str) -> tuple[Path, str | None] | None:
    """(folder, split) when `base` is a `save_to_disk` folder, optionally with `@SPLIT`."""
    for path, split in ((base, None), tuple(base.rsplit("@", 1)) if "@" in base else (None, None)):
        if path and any((Path(path).expanduser() / name).is_file()
                        for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return Path(path).expanduser(), split
    return None


def _from_folder(base: str, source: str, default_split: str = DEFAULT_SPLIT) -> Any:
    datasets = _datasets()
    found = _datasets_folder(base)
    if found is None:
        raise SafeneuronsError(f"data set {source!r} is no folder written by datasets' save_to_disk")
    folder, split = found
    loaded = datasets.load_from_disk(str(folder), keep_in_memory=True)
    if isinstance(loaded, datasets.Dataset):
        return loaded
    splits = list(loaded)
    chosen = split or (default_split if default_split in splits else splits[0] if len(splits) == 1 else None)
    if chosen not in splits:
        raise SafeneuronsError(f"data set {source!r} has the splits {', '.join(splits)}: name one as {folder}@SPLIT")
    return loaded[chosen]
