"""The Python code blocks of the README and docs/, as the docs tests run them.

A page's blocks run in order, in one namespace, in a fresh working directory, so a later
block uses what an earlier one made, exactly as a reader types them. Two HTML comments,
invisible on the rendered page, steer a block:

    <!-- docs: skip (why it cannot run here) -->    on the line before a fence: not run
    <!-- docs: setup
    code run at this point, before the blocks that follow (fixture files, tiny inputs)
    -->
"""
import dataclasses
import os
import re
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
_SKIP = re.compile(r"^\s*<!--\s*docs:\s*skip\b(.*?)-->\s*$")
_SETUP = re.compile(r"^\s*<!--\s*docs:\s*setup\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    page: str
    line: int            # 1-based line of the block's first code line
    kind: str            # "python", "setup" (hidden) or another fence language
    code: str
    skip_reason: str | None = None


def doc_pages() -> list[Path]:
    """README.md and every page under docs/, in a stable order."""
    return [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def blocks_of(text: str, page: str = "<page>") -> list[Block]:
    """Every fenced block and hidden setup of a Markdown text, in order."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if _SETUP.match(lines[i]):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->"), None)
            if end is None:
                raise ValueError(f"{page}:{i + 1}: '<!-- docs: setup' without a closing '-->'")
            blocks.append(Block(page, i + 2, "setup", "\n".join(lines[i + 1:end])))
            i = end + 1
            continue
        fence = _FENCE.match(lines[i])
        if fence and fence.group(2):
            indent, kind = fence.group(1), fence.group(2)
            end = next((j for j in range(i + 1, len(lines))
                        if lines[j].strip() == "```"), None)
            if end is None:
                raise ValueError(f"{page}:{i + 1}: a ```{kind} block is never closed")
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            skip = _SKIP.match(prev)
            reason = None
            if skip:
                reason = skip.group(1).strip(" ():—-")
                if not reason:
                    raise ValueError(f"{page}:{i}: 'docs: skip' needs a reason")
            body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1:end]]
            blocks.append(Block(page, i + 2, kind, "\n".join(body), reason))
            i = end + 1
            continue
        i += 1
    return blocks


def runnable(blocks: list[Block]) -> list[Block]:
    """The blocks the docs tests execute: Python and hidden setup, skips left out."""
    return [b for b in blocks if b.kind in ("python", "setup") and b.skip_reason is None]


class BlockFailed(AssertionError):
    """A documentation block raised: the message names the page and line."""


def run_blocks(blocks: list[Block], workdir: Path) -> dict:
    """Execute the blocks in order in one namespace with `workdir` as the working directory;
    the first failure raises BlockFailed naming its page and line."""
    namespace = {"__name__": "__docs__"}
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        for block in runnable(blocks):
            # Line numbers in tracebacks are the page's own.
            code = "\n" * (block.line - 1) + block.code
            try:
                exec(compile(code, block.page, "exec"), namespace)
            except Exception as e:
                line = next((lineno for frame, lineno in traceback.walk_tb(e.__traceback__)
                             if frame.f_code.co_filename == block.page), block.line)
                raise BlockFailed(f"{block.page}:{line}: the {block.kind} block starting at line "
                                  f"{block.line} raised {type(e).__name__}: {e}") from e
    finally:
        os.chdir(cwd)
    return namespace
