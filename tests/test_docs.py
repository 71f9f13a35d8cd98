"""The documentation holds together: the README stays short, every relative link
and anchor in README.md and docs/*.md resolves, every documented command of the
project's modules parses (each module's --help runs; distnn.train's and
launch.sweep's flags go through their own parsers and checks, the other modules'
flags must appear in their --help), and the README's test command is the one
.ci/run runs."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from distnn import config
from distnn.errors import UserError

from conftest import ROOT

README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
MODULES = ("distnn.train", "distnn.plot", "distnn.predict", "distnn.bench",
           "distnn.launcher", "data_prep", "launch.sweep")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


def split_fences(text):
    """(prose with fenced blocks blanked, [(language, body), …])."""
    blocks = [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]
    return FENCE.sub("", text), blocks


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    prose, _ = split_fences(path.read_text())
    seen, out = {}, set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= 160, f"README.md has {lines} lines; topic pages belong in docs/"


def test_docs_pages_are_linked_from_readme():
    prose, _ = split_fences(README.read_text())
    linked = {Path(t.split("#")[0]).name for t in re.findall(r"\]\((docs/[^)\s]+)\)", prose)}
    missing = [p.name for p in PAGES[1:] if p.name not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    prose, _ = split_fences(page.read_text())
    prose = re.sub(r"`[^`]*`", "", prose)       # links are not in inline code
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(ROOT)}")
        elif anchor and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


# ---------------------------------------------------------------- the commands

def documented_vars():
    """Shell variables the docs define in inline code, e.g. `PLAIN="--batch-size 64 …"`."""
    out = {}
    for page in PAGES:
        prose, _ = split_fences(page.read_text())
        for code in re.findall(r"`([^`]+)`", prose):
            m = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=\"([^\"]*)\"", " ".join(code.split()))
            if m:
                out[m.group(1)] = m.group(2)
    return out


def command_lines():
    """(where, shell line): each line of the fenced bash blocks (continuations
    joined), and each inline code span that runs `python -m`."""
    for page in PAGES:
        name = page.relative_to(ROOT)
        prose, blocks = split_fences(page.read_text())
        for lang, body in blocks:
            if lang in ("bash", "sh", "shell"):
                for line in body.replace("\\\n", " ").splitlines():
                    if line.strip() and not line.lstrip().startswith("#"):
                        yield f"{name} (bash block)", line
        for code in re.findall(r"`([^`]+)`", prose):
            code = " ".join(code.split())
            if re.search(r"python3? -m ", code):
                yield f"{name} (inline)", code


def module_calls():
    """(where, module, args) for every documented run of one of MODULES."""
    env = documented_vars()
    calls = []
    for where, line in command_lines():
        for name, value in env.items():
            line = re.sub(rf"\${name}\b|\$\{{{name}\}}", value, line)
        tokens = shlex.split(line, comments=True)
        segment = []
        for tok in tokens + ["&&"]:
            if tok not in ("&&", "||", ";", "|"):
                segment.append(tok)
                continue
            call = parse_segment(segment)
            if call and call[0] in MODULES:
                calls.append((where, call[0], [a for a in call[1] if "$" not in a], line))
            segment = []
    return calls


def parse_segment(tokens):
    """(module, args) if the command runs a Python module, directly, under mpirun,
    or as the Slurm batch script (whose arguments go to distnn.train)."""
    for i, tok in enumerate(tokens):
        if re.fullmatch(r"python3?(\.\d+)?", Path(tok).name) and tokens[i + 1:i + 2] == ["-m"]:
            return tokens[i + 2], tokens[i + 3:]
        if Path(tok).name == "train.sbatch" and "launch/slurm" in tok:
            return "distnn.train", tokens[i + 1:]
    return None


CALLS = module_calls()


def test_every_module_is_documented_with_a_command():
    found = {module for _, module, _, _ in CALLS}
    assert found == set(MODULES), f"no documented command for {sorted(set(MODULES) - found)}"


@pytest.fixture(scope="module")
def helps():
    """Each module's --help output (the modules run at once, in parallel)."""
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=ROOT, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for m in MODULES}
    out = {}
    for m, p in procs.items():
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, f"python -m {m} --help: exit {p.returncode}\n{stderr}"
        out[m] = stdout
    return out


@pytest.mark.parametrize("module", MODULES)
def test_module_help_runs(helps, module):
    assert "usage:" in helps[module]


def check_train_args(args):
    cfg = config.from_args(config.build_parser().parse_args(args))
    config.check(cfg)
    config.check_optimizer(cfg)


@pytest.mark.parametrize("where,module,args,line", CALLS,
                         ids=[f"{m} {' '.join(a)}"[:80] for _, m, a, _ in CALLS])
def test_documented_command_parses(helps, where, module, args, line):
    if "--help" in args or "-h" in args:
        return                                  # test_module_help_runs runs it
    try:
        if module == "distnn.train":
            check_train_args(args)
        elif module == "launch.sweep":
            from launch import sweep
            _, train_args = sweep.parse_args(args)
            check_train_args(train_args)
        else:
            flags = [a.split("=")[0] for a in args if a.startswith("--")]
            unknown = [f for f in flags
                       if not re.search(rf"{re.escape(f)}(?![\w-])", helps[module])]
            assert not unknown, f"{where}: {unknown} not in python -m {module} --help: {line}"
    except (UserError, SystemExit) as e:
        pytest.fail(f"{where}: {line}\n  does not parse: {e}")


def test_readme_test_command_is_what_ci_runs():
    ci = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()
          if "pytest" in ln and not ln.lstrip().startswith("#")]
    assert len(ci) == 1, f".ci/run: expected one line running pytest, got {ci}"
    readme_lines = [ln.strip() for where, ln in command_lines()
                    if where.startswith("README.md (bash")]
    assert ci[0] in readme_lines, f"README.md's test command differs from .ci/run's: {ci[0]}"
