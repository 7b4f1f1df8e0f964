"""mkdocs hooks (mkdocs.yml: ``hooks``).

- The engineers' notes in docs/notes/*.md (one per branch, folded into the guides by the lead)
  are added to the navigation under "Notes" when there are any, so a new note needs no edit of
  mkdocs.yml and the strict build never refers to a note that is not there.
- Some docstrings name objects with Sphinx roles (``:func:`top_eigenpairs` ``); mkdocstrings
  renders them as the role's text followed by the code, so the role is dropped from the page.
"""

from __future__ import annotations

import pathlib
import re

ROLE = re.compile(r":(?:mod|func|class|meth|attr|data|exc|obj):(?=<code>)")


def on_config(config):
    notes = sorted(pathlib.Path(config["docs_dir"], "notes").glob("*.md"))
    if notes and config["nav"] is not None:
        config["nav"].append({"Notes": [f"notes/{p.name}" for p in notes]})
    return config


def on_page_content(html, page, config, files):
    return ROLE.sub("", html)
