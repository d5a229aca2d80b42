"""Merge the finished rows of a sweep (slurm/array.sh) into one table: RESULTS/summary.csv and summary.json.

    python slurm/collect.py results/sweep [--out results/sweep/summary]

A row counts only when its folder has the DONE marker. Each table row holds the grid values (row.json) and
the scalar top-level values of every other JSON summary in the folder (score_summary.json,
freeze_report.json, analysis_summary.json, eval.json, ...), named `<file stem>.<key>`.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from safeneurons.runtime.outputs import atomic_file, write_json

GRID_KEYS = ("task", "model", "method", "sparsity", "seed", "stage")


def row_record(folder: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((folder / "row.json").read_text())
    record["folder"] = folder.name
    for summary in sorted(folder.glob("*.json")):
        if summary.name == "row.json":
            continue
        content = json.loads(summary.read_text())
        if isinstance(content, dict):
            record.update({f"{summary.stem}.{key}": value for key, value in content.items()
                           if isinstance(value, (str, int, float, bool)) or value is None})
    return record


def collect(results: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Records of the finished rows (in task order) and the names of the unfinished folders."""
    folders = sorted(path for path in results.iterdir() if path.is_dir() and not path.name.startswith("."))
    done = [folder for folder in folders if (folder / "DONE").is_file()]
    records = sorted((row_record(folder) for folder in done), key=lambda record: record.get("task", 0))
    return records, [folder.name for folder in folders if folder not in done]


def write_table(records: list[dict[str, Any]], prefix: Path) -> None:
    columns = list(GRID_KEYS) + sorted({key for record in records for key in record} - set(GRID_KEYS))
    write_json(prefix.with_suffix(".json"), records)
    with atomic_file(prefix.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the sweep's RESULTS folder")
    parser.add_argument("--out", type=Path, default=None, help="table path without suffix (default RESULTS/summary)")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        print(f"collect.py: error: results folder {args.results} does not exist", file=sys.stderr)
        return 2
    records, unfinished = collect(args.results)
    prefix = args.out or args.results / "summary"
    write_table(records, prefix)
    print(f"{len(records)} finished rows -> {prefix}.csv, {prefix}.json"
          + (f"; not finished: {', '.join(unfinished)}" if unfinished else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
