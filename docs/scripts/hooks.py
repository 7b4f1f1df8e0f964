"""mkdocs hooks (mkdocs.yml: ``hooks``).

The engineers' notes in docs/notes/*.md (one per branch, folded into the guides by the lead)
are added to the navigation under "Notes" when there are any, so a new note needs no edit of
mkdocs.yml and the strict build never refers to a note that is not there.
"""

from __future__ import annotations

import pathlib


def on_config(config):
    notes = sorted(pathlib.Path(config["docs_dir"], "notes").glob("*.md"))
    if notes and config["nav"] is not None:
        config["nav"].append({"Notes": [f"notes/{p.name}" for p in notes]})
    return config
