"""Reading the project's Markdown as GitHub renders it: heading anchors and relative links."""

from __future__ import annotations

import re
from pathlib import Path

_FENCE = re.compile(r"^```.*?^```", flags=re.M | re.S)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def heading_anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", _FENCE.sub("", path.read_text()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def relative_links(path: Path) -> list[str]:
    """The targets of a Markdown file's links that point inside the repository (no scheme), outside code blocks."""
    return [target for target in _LINK.findall(_FENCE.sub("", path.read_text())) if "://" not in target
            and not target.startswith("mailto:")]
