"""The Python code blocks of the README and docs/, as the docs tests run them.

A page's blocks run in order, in one namespace, in a fresh working directory, so a later
block uses what an earlier one made, exactly as a reader types them. Shell blocks run too:
their `python experiments/*.py` commands in the test process at test size (experiment_runs:
two steps, tiny images, TFDS mock data for a dataset that is not prepared), `python -m
flaxbones.*` commands as they are, `$HOME` being the working directory; the environment's
own commands (venv, pip, pytest, mkdocs) and job control (`&`, sleep, kill, wait) are not
run, and any other command must be in a skipped block. Two HTML comments, invisible on the
rendered page, steer a block:

    <!-- docs: skip (why it cannot run here) -->    on the line before a fence: not run
    <!-- docs: setup
    code run at this point, before the blocks that follow (fixture files, tiny inputs)
    -->
"""
import dataclasses
import importlib
import os
import re
import shlex
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


SHELL = ("bash", "sh", "shell")
_NOT_RUN = {"pip", "mkdocs", "sleep", "kill", "wait"}   # the environment's, job control
_NOT_RUN_MODULES = {"venv", "pip", "pytest"}


def runnable(blocks: list[Block]) -> list[Block]:
    """The blocks the docs tests execute: Python, shell and hidden setup, skips left out."""
    return [b for b in blocks
            if b.kind in ("python", "setup", *SHELL) and b.skip_reason is None]


def shell_commands(code: str) -> list[list[str]]:
    """A shell block's commands in order, each as its words: continued lines joined,
    comments dropped, split at `&&`, `;`, `|` and `&`, leading `NAME=value` dropped."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        command = []
        for word in [*lexer, ";"]:
            if word.strip(";&|"):
                if command or not re.match(r"^[A-Z_]+=", word):
                    command.append(word)
            elif command:
                commands.append(command)
                command = []
    return commands


def _run_command(words: list[str], home: Path) -> bool:
    """Run one shell command of a docs page; False for one the tests do not run."""
    import experiment_runs
    program, args = os.path.basename(words[0]), words[1:]
    if program in _NOT_RUN:
        return False
    if program not in ("python", "python3") or not args:
        raise ValueError(f"the tests cannot run `{program}`")
    if args[0] == "-m":
        module = args[1]
        if module in _NOT_RUN_MODULES:
            return False
        if not module.startswith("flaxbones."):
            raise ValueError(f"the tests cannot run `python -m {module}`")
        importlib.import_module(module).main(args[2:])
        return True
    runners = {"experiments/train.py": lambda a: experiment_runs.run_train(
                   a, home / "tensorflow_datasets"),
               "experiments/predict.py": experiment_runs.run_predict,
               "experiments/show_backbones.py": experiment_runs.run_show_backbones}
    if args[0] not in runners:
        raise ValueError(f"the tests cannot run `python {args[0]}`")
    runners[args[0]](args[1:])
    return True


def run_shell(block: Block, home: Path) -> None:
    """Run a shell block's commands in order (module docstring); one that fails raises
    naming its command, and a block that runs nothing must be marked skipped."""
    ran = 0
    for words in shell_commands(block.code.replace("$HOME", str(home))):
        try:
            ran += _run_command(words, home)
        except SystemExit as e:  # argparse and absl's usage errors
            if e.code:
                raise RuntimeError(f"`{shlex.join(words)}` exited with {e.code}") from e
        except Exception as e:
            raise RuntimeError(f"`{shlex.join(words)}`: {type(e).__name__}: {e}") from e
    if not ran:
        raise ValueError("the block runs no command the tests can run: mark it "
                         "`<!-- docs: skip (why) -->`")


class BlockFailed(AssertionError):
    """A documentation block raised: the message names the page and line."""


def run_blocks(blocks: list[Block], workdir: Path) -> dict:
    """Execute the blocks in order in one namespace with `workdir` as the working directory;
    the first failure raises BlockFailed naming its page and line."""
    namespace = {"__name__": "__docs__"}
    cwd = os.getcwd()
    os.chdir(workdir)
    to_run = runnable(blocks)
    link = Path(workdir) / "experiments"  # the commands name experiments/...
    if any(b.kind in SHELL for b in to_run) and not link.exists():
        link.symlink_to(ROOT / "experiments")
    try:
        for block in to_run:
            # Line numbers in tracebacks are the page's own.
            code = "\n" * (block.line - 1) + block.code
            try:
                if block.kind in SHELL:
                    run_shell(block, Path(workdir))
                    continue
                exec(compile(code, block.page, "exec"), namespace)
            except Exception as e:
                line = next((lineno for frame, lineno in traceback.walk_tb(e.__traceback__)
                             if frame.f_code.co_filename == block.page), block.line)
                raise BlockFailed(f"{block.page}:{line}: the {block.kind} block starting at line "
                                  f"{block.line} raised {type(e).__name__}: {e}") from e
    finally:
        os.chdir(cwd)
    return namespace
