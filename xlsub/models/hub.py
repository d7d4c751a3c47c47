"""Hugging Face hub ids told apart from local paths, for models (`xlsub.models.loading`) and datasets
(`xlsub.data.corpus`, `xlsub.data.parallel`).

Kept apart from those modules so that the corpus readers need not import `transformers`.
"""

from __future__ import annotations

import os
import re

# owner/name, or a bare canonical name (e.g. gpt2): models and datasets on the hub both have either.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_id(name: str) -> bool:
    """Whether `name` is spelled like a hub id (whether it exists there is another matter)."""
    return bool(_HUB_ID.match(name))


def looks_local(name: str) -> bool:
    """A name that must be a path: ./x, /x, ~/x, or a/b where folder a exists here.

    Such a name that does not exist fails at once rather than falling through to the hub.
    """
    if name.startswith((".", "/", "~")) or os.path.isabs(name):
        return True
    return "/" in name and os.path.isdir(name.split("/")[0])
