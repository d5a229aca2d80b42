"""The command line: `safeneurons COMMAND` (also `python -m safeneurons.cli COMMAND`), one module per command."""
from safeneurons.cli.app import STAGES, build_parser, main, normalize_option_spelling, run_as_script

__all__ = ["STAGES", "build_parser", "main", "normalize_option_spelling", "run_as_script"]
