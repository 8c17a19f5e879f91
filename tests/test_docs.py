"""The README is a doorway: short, its links lead somewhere, its commands parse, its figures come from the code."""

from __future__ import annotations

import re
import shlex

from epir.complexity import measure
from epir.presets import build_model, make_config
from grid.cli import build_parser

from .conftest import REPO

README = (REPO / "README.md").read_text()


def test_the_readme_is_short_and_its_links_exist():
    assert len(README.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)\)", README) + re.findall(r"`((?:docs|results|benchmarks|grid|epir)/[\w./-]+)`", README)
    missing = [p for p in links if not p.startswith("http") and not (REPO / p).exists() and "<" not in p]
    assert not missing and len(links) > 8, missing


def test_every_grid_command_of_the_readme_parses():
    block = "\n".join(re.findall(r"```bash\n(.*?)```", README, re.S)).replace("\\\n", " ")
    commands = [ln.split("#")[0].strip() for ln in block.splitlines() if "grid/run_all.py" in ln]
    assert len(commands) >= 6
    for c in commands:
        args = shlex.split(c)
        build_parser().parse_args(args[args.index("grid/run_all.py") + 1:])  # exits (fails the test) on a bad flag


def test_the_paper_configuration_figures_in_the_docs_are_the_codes():
    text = (REPO / "docs" / "model.md").read_text()
    c = measure(build_model(make_config("epir")))
    assert f"{c.params:,} parameters" in text and f"{c.macs / 1e6:.2f} M multiply-accumulates" in text


def test_ci_installs_the_lock_lints_and_runs_the_readmes_test_command():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    test_command = re.search(r"pip install uv && (uv run [^\n]*pytest)\n", README).group(1)
    assert test_command in ci and "--locked" in test_command  # the same command, from the committed lock
    assert "time uv sync --locked --compile-bytecode" in ci and "uv run --locked ruff check ." in ci
    assert (REPO / "uv.lock").is_file() and (REPO / "LICENSE").is_file()
