"""`--config FILE.yaml`: a command's options as a YAML mapping, keys in snake_case (`sparsity_ratio: 0.01`), under the
command line (a flag given there wins). Each key is checked against the command's own options with argparse's
types and choices, so a typo, a wrong type or an unknown value fails in one line naming the key and the file.
Every finished run writes the options it ran with to `config.yaml` in its results folder, so that
`safeneurons COMMAND --config DIR/config.yaml` runs it again.
"""
from __future__ import annotations

import argparse
import difflib
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from safeneurons.errors import SafeneuronsError

CONFIG_FILE = "config.yaml"
RESULT_FOLDERS = ("out", "results_path", "save_path")  # where a command's results go, by dest: the first one set
NOT_OPTIONS = ("help", "config")


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="options from a YAML file, keys in snake_case (sparsity_ratio: 0.01); the command "
                             "line wins; every run writes its own as config.yaml beside its results")


def config_file_of(argv: list[str]) -> str | None:
    """The value of --config on a normalized command line (before the command's parser knows the file's keys)."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--config", default=None)
    return peek.parse_known_args(argv)[0].config


def read_config_file(path: str) -> dict[str, Any]:
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SafeneuronsError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SafeneuronsError(f"config file {path} cannot be read ({error})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SafeneuronsError(f"config file {path} is not valid YAML{where}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise SafeneuronsError(f"config file {path} holds a {type(values).__name__}; expected a mapping of "
                               f"option: value")
    return values


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every key a config may use: each long option's snake_case spelling (aliases too), to its action."""
    keys = {}
    for action in parser._actions:
        if action.dest in NOT_OPTIONS or not action.option_strings:
            continue
        for option in action.option_strings:
            if option.startswith("--"):
                keys[option[2:].replace("-", "_")] = action
    return keys


def apply_config(parser: argparse.ArgumentParser, values: Mapping[str, Any], path: str) -> None:
    """The file's values as the parser's defaults (a required option the file sets is no longer required)."""
    actions = option_actions(parser)
    defaults = {}
    for key, value in values.items():
        action = actions.get(str(key))
        if action is None:
            near = difflib.get_close_matches(str(key), actions, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise SafeneuronsError(f"config file {path}: unknown key {key!r} for `{parser.prog.split()[-1]}`{hint}")
        defaults[action.dest] = _converted(action, value, str(key), path)
        action.required = False
    parser.set_defaults(**defaults)


def _converted(action: argparse.Action, value: Any, key: str, path: str) -> Any:
    where = f"config file {path}: {key}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise SafeneuronsError(f"{where} is {value!r}; expected true or false")
        return value if isinstance(action, argparse._StoreTrueAction) else not value  # `no_x: true` = x off
    if value is None:
        return None
    many = isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if not many:
        return _scalar(action, value, where)
    items = value if isinstance(value, list) else [value]
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise SafeneuronsError(f"{where} has {len(items)} values; expected a list of {action.nargs}")
    return [_scalar(action, item, where) for item in items]


def _scalar(action: argparse.Action, value: Any, where: str) -> Any:
    kind = action.type or str
    if isinstance(value, (list, dict)) or isinstance(value, bool) and kind is not str:
        raise SafeneuronsError(f"{where} is {value!r}; expected one {_kind_name(kind)}")
    if kind is int and isinstance(value, float):
        raise SafeneuronsError(f"{where} is {value!r}; expected an integer")
    try:
        converted = kind(value) if kind in (int, float) and not isinstance(value, str) else kind(str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise SafeneuronsError(f"{where} is {value!r}; expected {_kind_name(kind)}") from None
    if action.choices is not None and converted not in action.choices:
        raise SafeneuronsError(f"{where} is {value!r}; expected one of {', '.join(map(str, action.choices))}")
    return converted


def _kind_name(kind: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string"}.get(kind, getattr(kind, "__name__", "a value"))


def resolved_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The options a run used, by the snake_case name of each option's first (canonical) flag."""
    resolved = {}
    for action in parser._actions:
        if action.dest in NOT_OPTIONS or not action.option_strings or not hasattr(args, action.dest):
            continue
        flag = next(option for option in action.option_strings if option.startswith("--"))
        value = getattr(args, action.dest)
        if isinstance(action, argparse._StoreFalseAction):  # the key says whether the flag was in effect
            value = value is False
        resolved[flag[2:].replace("-", "_")] = _plain(value)
    return resolved


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return str(value) if isinstance(value, os.PathLike) else value


def result_folder(args: argparse.Namespace) -> Path | None:
    for dest in RESULT_FOLDERS:
        value = getattr(args, dest, None)
        if value:
            return Path(value)
    return None


def write_resolved_config(folder: Path, command: str, options: Mapping[str, Any]) -> Path:
    """`folder/config.yaml`, written whole then renamed into place."""
    target = folder / CONFIG_FILE
    staged = folder / f".{CONFIG_FILE}.partial"
    header = (f"# The options of `safeneurons {command}` for this run; run it again with\n"
              f"#   safeneurons {command} --config {target}\n")
    staged.write_text(header + yaml.safe_dump(dict(options), sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(staged, target)
    return target


def named_in_file(message: str, values: Mapping[str, Any], path: str) -> str:
    """A validation error about an option the config file set, with the key and the file named."""
    for key in values:
        spellings = (f"--{str(key).replace('_', '-')}", f"{key}=", f"{str(key).replace('_', ' ')} ")
        if any(spelling in message for spelling in spellings):
            return f"{message} (set by {key} in config file {path})"
    return message
