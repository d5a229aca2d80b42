"""The docs cannot rot: every `safeneurons` command that README.md and docs/ show is checked by the real CLI
(parsed, turned into its config, validated), and every demo command in a ```bash block runs as written, in the
order the pages give them, in one scratch folder (a page's command may use what an earlier one wrote)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from helpers import REPO
from safeneurons import cli
from safeneurons.cli.app import check_command

PAGES = [REPO / "README.md", *(REPO / "docs" / name for name in (
    "scoring.md", "causal.md", "finetuning.md", "defences.md", "evaluation.md", "pipeline.md", "patching.md",
    "lineage.md", "cluster.md", "models.md", "data.md", "api.md", "direction.md", "moe.md", "circuits.md"))]
DEMO_MODELS = {"demo", "demo-chat", "demo-base", "demo-moe", "demo-moe-chat", "demo-moe-base"}
OUTPUT_OPTIONS = {"--out", "--results-path", "--save-path", "--checkpoint-dir"}
MODEL_OPTIONS = {"--model", "--base", "--other", "--original", "--finetuned", "--model-before", "--model-after"}
# The no-argument demo study is the README's first command; its stages run in tests/workflows/test_pipeline.py
# on fewer samples (the full profile takes minutes), so here it is checked, not run.
CHECKED_ONLY = {("pipeline",)}


def _shell_lines(block: str) -> list[str]:
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def commands(page: Path, runnable_only: bool, demo_only: bool = True) -> list[list[str]]:
    """The page's (demo) commands as argument lists (comments dropped), in page order: those of ```bash blocks,
    and unless `runnable_only` also those quoted inline in `code`."""
    text = page.read_text()
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in _shell_lines(block)]
    if not runnable_only:  # complete command lines quoted in the prose (not a bare name, not a synopsis)
        lines += [span for span in re.findall(r"`(safeneurons [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
                  if "--" in span and "[" not in span]
    found = []
    for line in lines:
        line = line.strip()
        if not line.startswith("safeneurons ") or "..." in line or "|" in line:
            continue
        argv = shlex.split(line, comments=True)[1:]
        if argv and (_runs_a_demo_model(argv) or not demo_only):
            found.append(argv)
    return found


def _runs_a_demo_model(argv: list[str]) -> bool:
    """On a demo model, on what an earlier demo command wrote (`out/…`), or the pipeline's demo default."""
    models = [argv[index + 1] for index, token in enumerate(argv[:-1]) if token in MODEL_OPTIONS]
    inputs = [token for index, token in enumerate(argv[1:], 1) if argv[index - 1] not in OUTPUT_OPTIONS]
    return (any(model in DEMO_MODELS for model in models) or (argv[0] == "pipeline" and "--model" not in argv)
            or any(token.startswith("out/") for token in inputs))


def all_commands(runnable_only: bool, demo_only: bool = True) -> list[tuple[str, list[str]]]:
    return [(page.name, argv) for page in PAGES for argv in commands(page, runnable_only, demo_only)]


def test_the_pages_show_demo_commands():
    names = {argv[0] for _, argv in all_commands(runnable_only=True)}
    assert {"score", "prune", "eval", "finetune", "compare", "patch", "trace", "lowrank", "rewind", "ablate"} <= names


@pytest.mark.parametrize("page, argv", all_commands(runnable_only=False, demo_only=False),
                         ids=lambda value: value if isinstance(value, str) else " ".join(value)[:60])
def test_every_command_the_pages_show_is_a_valid_command_line(page, argv):
    """Demo or not (Llama-2 on a cluster): the options exist and their values pass the command's checks."""
    check_command(argv)


def test_a_bad_option_in_a_page_would_fail():
    with pytest.raises(SystemExit):
        check_command(["score", "--model", "demo", "--method", "wandg", "--data", "demo-align", "--no-such-option"])
    with pytest.raises(cli.app.SafeneuronsError, match="sparsity ratio"):
        check_command(["score", "--model", "demo", "--method", "wandg", "--data", "demo-align",
                       "--sparsity-ratio", "2", "--out", "o"])


@pytest.mark.slow
def test_every_demo_command_in_a_bash_block_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = []
    for page, argv in all_commands(runnable_only=True):
        if tuple(argv) in CHECKED_ONLY:
            continue
        code = cli.main(argv)
        assert code == 0, f"{page}: safeneurons {' '.join(argv)} exited {code}"
        ran.append(argv[0])
    assert len(ran) >= 12


def test_the_demo_figures_the_pages_quote_are_measured_now():
    """docs/demo_figures.py measures the figures again and compares them with docs/demo_figures.json, and every
    page quotes each figure as that file records it."""
    import json
    import subprocess
    import sys

    checked = subprocess.run([sys.executable, "docs/demo_figures.py", "--check"], cwd=REPO, capture_output=True,
                             text=True, timeout=600)
    assert checked.returncode == 0, checked.stderr[-2000:]
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import demo_figures
    finally:
        sys.path.remove(str(REPO / "docs"))
    figures = json.loads((REPO / "docs" / "demo_figures.json").read_text())
    for page, needed in demo_figures.quotes(figures).items():
        text = " ".join((REPO / "docs" / page).read_text().split())
        assert [quote for quote in needed if quote not in text] == [], page
