"""The documentation cannot drift from the code: the plan reference is what the code generates, every
command and flag of the CLI is documented, and every `segplan ...` shown is accepted by the parser."""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

from segplan.planner.plan_reference import markdown, rows
from segplan.runner.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
# placeholders the pages use for values: replaced by something of the right type before parsing
PLACEHOLDERS = {"K": "0", "N": "2", "GB": "8", "MIN": "15", "MM": "1", "S": "0", "F": "0.25", "W": "2",
                "HOURS": "24", "P": "gpu"}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _mentions(pages: list[Path]) -> list[tuple[str, str, bool]]:
    """(page, command text, complete) for every `segplan ...` in inline code or a code block; a code
    block line is a complete command, an inline span may be a mention inside a sentence."""
    found = []
    for page in pages:
        text = page.read_text()
        # fences paired from the start of a line: a ```yaml block's closing fence never opens a block
        for block in re.findall(r"^```(?:bash|sh)?\n(.*?)^```", re.sub(r"^```(?!bash|sh)\w+\n.*?^```", "", text,
                                                                     flags=re.S | re.M), flags=re.S | re.M):
            for line in block.splitlines():
                m = re.search(r"(?:^|\s)(segplan\s.*)$", line.split(" #")[0].strip())
                if m:
                    found.append((page.name, m.group(1), True))
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for span in re.findall(r"`([^`\n]*segplan [^`\n]*)`", prose):
            m = re.search(r"(?:^|\s)(segplan\s.*)$", span)
            if m:
                found.append((page.name, m.group(1), False))
    return found


def _tokens(command: str) -> list[str]:
    """Shell words of a shown command, optional groups opened, the first of `a|b` alternatives taken,
    placeholders given values, `...` dropped after values and kept as one argument elsewhere."""
    command = command.replace("\\|", "|").replace("[", " ").replace("]", " ").rstrip("& ")
    out = []
    for tok in shlex.split(command)[1:]:
        tok = tok.split("|")[0]
        if tok == "...":
            if out and (out[-1].lstrip("-").replace(".", "").isdigit() or out[-1] in PLACEHOLDERS.values()):
                continue
            tok = "X"
        out.append(PLACEHOLDERS.get(tok, tok))
    return out


def test_plan_reference_is_what_the_code_generates():
    page = (DOCS / "plan-reference.md").read_text()
    assert page == markdown(), "docs/plan-reference.md is stale: segplan schema --markdown > docs/plan-reference.md"


def test_plan_reference_lists_every_key_and_the_cli_prints_it():
    keys = [k for k, *_ in rows()]
    for key in ("training.schedule.monitor", "intensity.normalization.<i>.scheme", "memory.measured_gb"):
        assert key in keys
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["schema", "--markdown"]) == 0
    assert out.getvalue() == markdown()
    page = markdown()
    assert all(f"`{k}`" in page for k in keys)
    assert "one of `train_loss`, `val_loss`" in page      # allowed values from the Literal type


def test_every_command_and_flag_is_documented():
    text = "\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))
    missing = []
    commands = {"": build_parser(), **_subparsers()}
    for name, sub in commands.items():
        if name and f"segplan {name}" not in text:
            missing.append(f"segplan {name}")
        for action in sub._actions:
            flags = [f for f in action.option_strings if f not in ("-h", "--help")]
            if flags and not any(re.search(re.escape(f) + r"(?![\w-])", text) for f in flags):
                missing.append(f"segplan {name} {flags[-1]}".replace("  ", " "))
    assert not missing, f"not documented in docs/: {missing}"


def problems(pages: list[Path]) -> tuple[int, list[str]]:
    """(commands seen, what the parser refuses): an unknown command or flag anywhere; for a code-block
    line, anything argparse refuses (missing arguments, wrong types, unknown choices)."""
    subs = _subparsers()
    mentions = _mentions(pages)
    wrong = []
    for page, command, complete in mentions:
        tokens = _tokens(command)
        if not tokens or tokens[0] == "--verbose":
            continue
        if tokens[0] not in subs:
            wrong.append(f"{page}: {command}: no command '{tokens[0]}'")
            continue
        known = subs[tokens[0]]._option_string_actions
        wrong += [f"{page}: {command}: no flag {t}" for t in tokens
                  if t.startswith("-") and t not in known and not t.lstrip("-").replace(".", "").isdigit()]
        if complete:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    build_parser().parse_args(tokens)
                except SystemExit:
                    wrong.append(f"{page}: {command}: {err.getvalue().strip().splitlines()[-1]}")
    return len(mentions), wrong


def test_every_shown_command_is_accepted_by_the_parser():
    seen, wrong = problems(PAGES)
    assert seen > 40      # the pages do show commands: an empty scan would pass vacuously
    assert not wrong, "\n".join(wrong)


def test_the_scan_catches_a_renamed_flag_and_a_broken_command(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run `segplan run PLAN --fold 0 --resumee`.\n\n```bash\nsegplan plan DATASET --gpu-memory\n"
                    "segplan export PLAN --format pdf -o X\n```\n")
    seen, wrong = problems([page])
    assert seen == 3
    assert any("no flag --resumee" in w for w in wrong)
    assert any("--gpu-memory" in w and "expected one argument" in w for w in wrong)
    assert any("invalid choice: 'pdf'" in w for w in wrong)
