"""The documentation runs: every Python and shell block of README.md and docs/ executes
(page by page, as a reader would type it; experiments/ commands at test size), the local
links resolve, and the site builds strictly."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from docs_blocks import (ROOT, BlockFailed, blocks_of, doc_pages, page_id, run_blocks, runnable,
                         shell_commands)

PAGES = doc_pages()


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_page_code_runs(page, tmp_path):
    blocks = blocks_of(page.read_text(), page_id(page))
    if not runnable(blocks):
        pytest.skip("no blocks to run (none, or all skipped with a reason)")
    run_blocks(blocks, tmp_path)


def test_a_broken_example_fails_and_names_its_line(tmp_path):
    page = ("# A page\n\n```python\nx = 1\n```\n\n<!-- docs: skip (a sketch) -->\n"
            "```python\nundefined_name\n```\n\ntext\n\n```python\ny = x + 1\nassert y == 3\n```\n")
    blocks = blocks_of(page, "broken.md")
    assert [b.kind for b in runnable(blocks)] == ["python", "python"]  # the sketch is not run
    with pytest.raises(BlockFailed, match=r"broken\.md:16: .*AssertionError"):
        run_blocks(blocks, tmp_path)


def test_a_broken_command_fails_and_names_it(tmp_path):
    """Shell blocks run: a misspelt config field stops the command (absl parses it as
    train.py would), and a command the tests cannot run needs a skipped block."""
    page = ("```bash\npython experiments/train.py --config=experiments/configs/tiny.py \\\n"
            "    --config.batch_sise=2 --workdir=w   # a typo\n```\n")
    with pytest.raises(BlockFailed, match=r"<page>:2: .*`python experiments/train\.py "
                                          r"--config=\S+ --config\.batch_sise=2 --workdir=w`"):
        run_blocks(blocks_of(page), tmp_path)
    with pytest.raises(BlockFailed, match="cannot run `make`"):
        run_blocks(blocks_of("```bash\nmake html\n```\n"), tmp_path)
    with pytest.raises(BlockFailed, match="runs no command the tests can run"):
        run_blocks(blocks_of("```bash\npip install flaxbones\n```\n"), tmp_path)
    commands = shell_commands("A=1 python x.py --f='{\"a\": 1}' &  # c\nsleep 1; wait")
    assert commands == [["python", "x.py", '--f={"a": 1}'], ["sleep", "1"], ["wait"]]


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
                             str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr


# --- shell blocks: the commands name scripts, flags and config fields that exist -------
_COMMAND = re.compile(r"python3?\s+(-m\s+[\w.]+|[\w/]+\.py)((?:\s+(?!#)\S+)*)")
_ABSL_FLAG = re.compile(
    r"DEFINE_(?:string|integer|float|bool|boolean|enum|list|multi_\w+)\(\s*\"(\w+)\"")
_ARGPARSE_FLAG = re.compile(r"add_argument\(\s*\"--([\w-]+)\"")


def _shell_commands():
    for page in PAGES:
        for block in blocks_of(page.read_text(), page_id(page)):
            if block.kind not in ("bash", "sh", "shell"):
                continue
            text = block.code.replace("\\\n", " ")
            for line in text.splitlines():
                for command in re.split(r"&&|;|\|", line.split(" #")[0]):
                    for match in _COMMAND.finditer(command):
                        yield f"{block.page}:{block.line}", match.group(1), match.group(2).split()


def _config_has(config, path):
    for part in path.split("."):
        if part not in config:
            return False
        config = config[part]
    return True


def test_shell_commands_name_real_scripts_flags_and_config_fields():
    """Every `python experiments/...`, `python -m ...` command of the docs, skipped blocks
    included, names a script that exists with flags it defines and `--config.x` fields its
    config has (the blocks that are not skipped also run, in test_page_code_runs)."""
    import importlib.util
    checked, problems = 0, []
    for where, target, args in _shell_commands():
        if target.startswith("-m"):
            module = target.split()[-1]
            if module.split(".")[0] not in ("flaxbones", "benchmarks", "experiments"):
                continue  # pytest, pip, venv
            script = ROOT / (module.replace(".", "/") + ".py")
        elif target.startswith("experiments/"):
            script = ROOT / target
        else:
            continue  # the reader's own script
        if not script.exists():
            problems.append(f"{where}: {target} does not exist")
            continue
        source = script.read_text()
        defined = set(_ABSL_FLAG.findall(source)) | set(_ARGPARSE_FLAG.findall(source))
        if "DEFINE_config_file" in source:
            defined.add("config")
        config = None
        for arg in args:
            if not arg.startswith("--"):
                continue
            name, _, value = arg[2:].partition("=")
            if name.startswith("config.") and config is not None:
                if not _config_has(config, name.removeprefix("config.")):
                    problems.append(f"{where}: the config has no field {name!r}")
            elif name == "config":
                spec = importlib.util.spec_from_file_location("_docs_config", ROOT / value)
                module = importlib.util.module_from_spec(spec)
                sys.path.insert(0, os.path.dirname(ROOT / value))
                try:
                    spec.loader.exec_module(module)
                    config = module.get_config()
                finally:
                    sys.path.pop(0)
            elif name not in defined and not (name.startswith("no") and name[2:] in defined):
                problems.append(f"{where}: {script.name} defines no flag --{name}")
        checked += 1
    assert checked >= 10 and not problems, problems


API_MODULES = ("flaxbones", "flaxbones.train", "flaxbones.data", "flaxbones.detection",
               "flaxbones.train.checkpoint")


def test_every_public_name_is_in_the_api_reference_with_its_arguments_documented():
    """A new public function or class (a module's __all__, or its public definitions)
    must be on an API page (`::: module.name`, or its submodule's members there) with a
    docstring, and a function's arguments under `Args:`: the reference cannot drift."""
    import importlib
    import inspect
    api = "\n".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.md"))
    referenced = set(re.findall(r"^::: ([\w.]+)", api, re.M))
    problems = []
    for module_name in API_MODULES:
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None) or [
            n for n, obj in vars(module).items() if not n.startswith("_")
            and getattr(obj, "__module__", None) == module_name]
        for name in names:
            obj, full = getattr(module, name), f"{module_name}.{name}"
            if inspect.ismodule(obj):
                if not any(r == obj.__name__ or r.startswith(obj.__name__ + ".")
                           for r in referenced):
                    problems.append(f"{full}: no member of it on an API page")
                continue
            if full not in referenced:
                problems.append(f"{full}: not on an API page")
            doc = inspect.getdoc(obj) or ""
            if callable(obj) and not doc:
                problems.append(f"{full}: no docstring")
            if inspect.isfunction(obj) and set(inspect.signature(obj).parameters) - {"self"} \
                    and "Args:" not in doc:
                problems.append(f"{full}: its arguments are not under Args:")
    assert not problems, "\n".join(problems)
