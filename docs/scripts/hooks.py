"""mkdocs hooks (mkdocs.yml: ``hooks``).

- The engineers' notes in docs/notes/*.md (one per branch, folded into the guides by the lead)
  are added to the navigation under "Notes" when there are any, so a new note needs no edit of
  mkdocs.yml and the strict build never refers to a note that is not there.
- docs/cli.md's line ``<!-- landscape --help -->`` becomes the ``--help`` of every subcommand,
  taken from the parser itself (``landscape.cli.parser.build_parser``), so the page lists every
  option with its default as the installed command has them.
- Some docstrings name objects with Sphinx roles (``:func:`top_eigenpairs` ``); mkdocstrings
  renders them as the role's text followed by the code, so the role is dropped from the page.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re

ROLE = re.compile(r":(?:mod|func|class|meth|attr|data|exc|obj):(?=<code>)")


def on_config(config):
    notes = sorted(pathlib.Path(config["docs_dir"], "notes").glob("*.md"))
    if notes and config["nav"] is not None:
        config["nav"].append({"Notes": [f"notes/{p.name}" for p in notes]})
    return config


HELP_MARKER = "<!-- landscape --help -->"


def cli_help_markdown(width: int = 100) -> str:
    """``landscape COMMAND --help`` of every subcommand, as Markdown sections."""
    from landscape.cli.parser import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)  # argparse wraps to the terminal width it reads here
    try:
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parts = [f"### `landscape {name}`\n\n```text\n{command.format_help().rstrip()}\n```\n"
                 for name, command in sub.choices.items()]
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(parts)


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "cli.md":
        if HELP_MARKER not in markdown:
            raise ValueError(f"docs/cli.md lost its {HELP_MARKER!r} line")
        markdown = markdown.replace(HELP_MARKER, cli_help_markdown())
    return markdown


def on_page_content(html, page, config, files):
    return ROLE.sub("", html)
