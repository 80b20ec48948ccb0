"""Every cross-reference a reader follows exists: the `module.name` (function, class, constant,
method) and the repository paths (experiments/..., tests/..., data/..., a file.py) that README and
the top-level files' docstrings and comments name. A rename or a moved report then fails here,
not in a reader's hands.  Run: pytest tests/test_references.py"""
import glob
import importlib
import io
import os
import re
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py")))
NAME = re.compile(r"(?<![\w./-])(" + "|".join(MODULES) + r")\.([A-Za-z_]\w*)((?:\.[A-Za-z_]\w*)*)")
PATH = re.compile(r"(?<![\w./-])((?:experiments|tests|data|results|\.ci)/[\w./-]*[\w/]"
                  r"|[a-z_]+\.py)\b")


def prose(path):
    """The comments and strings of a Python file (its docstrings among them), or a Markdown file's
    text."""
    text = open(path, encoding="utf-8").read()
    if not path.endswith(".py"):
        return text
    return "\n".join(t.string for t in tokenize.generate_tokens(io.StringIO(text).readline)
                     if t.type == tokenize.COMMENT or t.type == tokenize.STRING
                     and "f" not in t.string[:2].lower())   # an f-string's names are code


def references(text):
    """(module.name references, paths) named in `text`."""
    names = {(m, attr + rest) for m, attr, rest in NAME.findall(text) if attr != "py"}
    paths = {p.rstrip(".") for p in PATH.findall(text)}
    return names, paths


SOURCES = ["README.md"] + [f"{m}.py" for m in MODULES]


@pytest.mark.parametrize("source", SOURCES)
def test_what_a_file_names_exists(source):
    names, paths = references(prose(os.path.join(ROOT, source)))
    missing = []
    for module, dotted in sorted(names):
        obj = importlib.import_module(module)
        for part in dotted.split("."):
            if not hasattr(obj, part) and part not in getattr(obj, "__dataclass_fields__", {}):
                missing.append(f"{module}.{dotted}")
                break
            obj = getattr(obj, part, None)
    missing += [p for p in sorted(paths) if not any(   # a bare file.py: at the top or one down
        glob.glob(os.path.join(ROOT, d, p)) for d in ("", "experiments", "tests"))]
    assert not missing, f"{source} names what does not exist: {missing}"


def test_the_check_sees_a_stale_reference():
    """What the test above would catch: a renamed function, a report moved out of results/."""
    names, paths = references("see `train.no_such_step` and (results/memory-cpu.md)")
    assert names == {("train", "no_such_step")} and paths == {"results/memory-cpu.md"}
    assert not glob.glob(os.path.join(ROOT, "results/memory-cpu.md"))
    names, paths = references("the engine: rollout.HFEngine.sleep (experiments/memory-cpu.md)")
    assert names == {("rollout", "HFEngine.sleep")} and paths == {"experiments/memory-cpu.md"}


def test_readme_lists_every_loss():
    """README's --loss list is LOSSES' keys, no more, no fewer."""
    from losses import LOSSES
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    para = text[text.index("`--loss`:"):].split("\n\n")[0]
    assert set(re.findall(r"`(\w+)`", para)) == set(LOSSES)
