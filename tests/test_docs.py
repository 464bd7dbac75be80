"""The README and docs/ hold together: every relative link names a file that exists and, with `#anchor`, a heading in it;
every docs page is reachable from the README. (Each page's content is checked against the code by the tests of what it
documents: tests/llmcf/test_settings.py, test_events.py, test_metrics.py, tests/compose/test_compose.py.)"""

from pathlib import Path

from testkit.docs import heading_anchors, relative_links

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in relative_links(page):
            document, _, anchor = target.partition("#")
            linked = (page.parent / document).resolve() if document else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_the_readme_links_every_docs_page():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in relative_links(ROOT / "README.md")}
    assert not [page.name for page in PAGES[1:] if page.resolve() not in linked]


def test_the_readme_stays_a_front_page():
    """Two commands, a short tour and links: the reference lives in docs/."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 120


def test_every_module_the_docs_name_exists():
    """A page that names `package/module.py` (or `package/module.py::name`) keeps naming a real one after a move."""
    import re

    missing = []
    for page in PAGES:
        for path in re.findall(r"`((?:llmcf|streams|generators|ranker|storage|bench|testkit|tests|compose|migrations)/[\w/.-]+)",
                               page.read_text()):
            operator_made = path.endswith("/.env")  # written by the operator from .env.example
            if not operator_made and not (ROOT / path.rstrip(".")).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, missing


def test_the_readme_and_the_architecture_page_draw_the_same_diagram():
    import re

    def diagram(path: Path) -> str:
        return re.search(r"^```\n( platforms.*?)^```", path.read_text(), flags=re.M | re.S).group(1)

    assert diagram(ROOT / "README.md") == diagram(ROOT / "docs" / "architecture.md")
