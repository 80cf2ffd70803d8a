"""The documentation runs: every Python block of README.md and docs/ executes (page by page,
as a reader would type it), the README's local links resolve, and the site builds strictly."""
import re
import shutil
import subprocess
import sys

import pytest

from docs_blocks import ROOT, BlockFailed, blocks_of, doc_pages, page_id, run_blocks, runnable

PAGES = doc_pages()


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_page_code_runs(page, tmp_path):
    blocks = blocks_of(page.read_text(), page_id(page))
    if not runnable(blocks):
        pytest.skip("no Python blocks")
    run_blocks(blocks, tmp_path)


def test_a_broken_example_fails_and_names_its_line(tmp_path):
    page = ("# A page\n\n```python\nx = 1\n```\n\n<!-- docs: skip (a sketch) -->\n"
            "```python\nundefined_name\n```\n\ntext\n\n```python\ny = x + 1\nassert y == 3\n```\n")
    blocks = blocks_of(page, "broken.md")
    assert [b.kind for b in runnable(blocks)] == ["python", "python"]  # the sketch is not run
    with pytest.raises(BlockFailed, match=r"broken\.md:16: .*AssertionError"):
        run_blocks(blocks, tmp_path)


def test_hidden_setup_runs_and_a_skip_needs_a_reason(tmp_path):
    page = "<!-- docs: setup\nopen('f.txt', 'w').write('hi')\n-->\n```python\n" \
           "assert open('f.txt').read() == 'hi'\n```\n"
    assert run_blocks(blocks_of(page), tmp_path)["__name__"] == "__docs__"
    with pytest.raises(ValueError, match="needs a reason"):
        blocks_of("<!-- docs: skip -->\n```python\npass\n```\n")


_LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_local_links_resolve(page):
    missing = [target for target, _ in _LINK.findall(page.read_text())
               if "://" not in target and not (page.parent / target).exists()]
    assert not missing, f"{page_id(page)} links to missing files: {missing}"


@pytest.mark.skipif(shutil.which("mkdocs", path=str(ROOT / ".venv/bin")) is None
                    and shutil.which("mkdocs") is None, reason="mkdocs is not installed")
def test_site_builds_strictly(tmp_path):
    """A broken link, a missing page or an API reference to nothing fails the build."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                             str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
