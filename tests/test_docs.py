"""The documentation builds, and every code example in it and in the README runs.

- ``mkdocs build --strict`` must pass (broken links, missing pages, docstrings that do
  not parse, unresolved cross-references all fail it), and the API reference must
  document every name the public modules export.
- Every fenced code block of ``README.md`` and ``docs/**/*.md`` is executed. A page's
  blocks run top to bottom in one fresh Python process (``python`` blocks in one
  namespace, ``bash``/``sh`` blocks with ``bash -e`` in between, and the ``$ `` lines of
  ``console`` transcripts), in an empty temporary working directory, so a block may use
  what the blocks above it on the same page defined or wrote. A block preceded by
  ``<!-- file: NAME -->`` is written to ``NAME`` instead (a script that a later shell
  block runs, e.g. with ``torchrun``). Blocks in other languages (``text``, ``yaml``,
  ``toml``...) are not code examples and are not run.
- A block that cannot run in CI (several GPUs, several hosts, package installation,
  minutes of compute) is preceded by an HTML comment that says why,
  ``<!-- skip: needs several GPUs -->``; a skip without a reason fails, and so does a
  skip marker that is not directly above a code block. Skipped Python blocks must still
  compile. ``test_skipped_blocks`` lists them and caps their number.
- ``docs/make_figures.py`` produces every figure the pages show (run here at small
  sizes into a temporary folder).

The examples run single-threaded (``OMP_NUM_THREADS=1`` and the TensorFlow/XLA
equivalents): on a shared 2-core machine a second thread per process makes PyTorch's
small products wait on descheduled threads, up to a hundred times slower. Pages run two
at a time (``SPECDENS_DOCS_WORKERS`` changes that), each in its own process.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md", *DOCS.rglob("*.md")])
MAX_SKIPPED = 8
PAGE_TIMEOUT = 300
# Pages run in parallel processes, each single-threaded: 2 keeps a 2-core machine busy.
WORKERS = int(os.environ.get("SPECDENS_DOCS_WORKERS", "2"))

PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")
SKIP = re.compile(r"^[ \t]*<!--\s*skip\b(?P<rest>.*?)-->[ \t]*$")
FILE = re.compile(r"^[ \t]*<!--\s*file:\s*(?P<name>[\w.-]+)\s*-->[ \t]*$")

EXPORTING_MODULES = [
    "specdens",
    "specdens.analysis",
    "specdens.tracker",
    "specdens.plotting",
    "specdens.testing",
    "specdens.examples",
    "specdens.summary",
    "specdens.backends.torch",
    "specdens.backends.torch.tracking",
    "specdens.backends.jax",
    "specdens.backends.jax.tracking",
    "specdens.backends.tf",
    "specdens.backends.tf.tracking",
]


@dataclass(frozen=True)
class Block:
    page: Path
    line: int          # 1-based line of the first line of code
    lang: str          # "python" or "shell"
    code: str
    skip: str | None   # the reason, "" for a marker without one, None when it runs
    file: str | None = None   # written to this file instead of run (``<!-- file: -->``)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def extract(page: Path) -> tuple[list[Block], list[str]]:
    """The code blocks of a Markdown page, and the problems found with skip markers."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    pending: tuple[int, str] | None = None   # (line, reason) of a skip marker above
    target: str | None = None                # file name of a file marker above
    i = 0
    while i < len(lines):
        m = FILE.match(lines[i])
        if m:
            target = m.group("name")
            i += 1
            continue
        m = SKIP.match(lines[i])
        if m:
            if pending is not None:
                problems.append(f"{page.relative_to(ROOT)}:{pending[0]}: skip marker not "
                                "directly above a code block")
            rest = m.group("rest").strip()
            reason = rest[1:].strip() if rest.startswith(":") else ""
            pending = (i + 1, reason)
            i += 1
            continue
        m = FENCE.match(lines[i])
        if m:
            indent, fence = m.group("indent"), m.group("fence")
            info = m.group("info").strip().split()
            lang = info[0].lower().lstrip(".{") if info else ""
            j = i + 1
            body = []
            closing = re.compile(rf"^{re.escape(indent)}{re.escape(fence[0])}{{{len(fence)},}}"
                                 r"[ \t]*$")
            while j < len(lines) and not closing.match(lines[j]):
                body.append(lines[j][len(indent):] if lines[j].startswith(indent)
                            else lines[j].lstrip())
                j += 1
            kind = "python" if lang in PYTHON else "shell" if lang in SHELL else None
            if lang == "console":  # a transcript: run the "$ " lines, not the output
                body = [ln[2:] if ln.startswith("$ ") else "" for ln in body]
            if kind is not None:
                skip = None if pending is None else pending[1]
                blocks.append(Block(page, i + 2, kind, "\n".join(body) + "\n", skip, target))
            elif pending is not None:
                problems.append(f"{page.relative_to(ROOT)}:{pending[0]}: skip marker above a "
                                f"{lang or 'plain'} block, which is never run")
            pending = target = None
            i = j + 1
            continue
        if pending is not None and lines[i].strip():
            problems.append(f"{page.relative_to(ROOT)}:{pending[0]}: skip marker not directly "
                            "above a code block")
            pending = None
        i += 1
    if pending is not None:
        problems.append(f"{page.relative_to(ROOT)}:{pending[0]}: skip marker at the end of "
                        "the page")
    return blocks, problems


# Executed in a fresh interpreter per page: python blocks in one namespace, shell blocks in
# between, each compiled with its page and line so that tracebacks point into the page.
RUNNER = textwrap.dedent("""
    import json, subprocess, sys, traceback
    spec = json.load(open(sys.argv[1], encoding="utf-8"))
    namespace = {"__name__": "__main__"}
    for block in spec:
        where = block["page"] + ":" + str(block["line"])
        print("=== " + where + " (" + block["lang"] + ")", flush=True)
        if block["file"]:
            with open(block["file"], "w", encoding="utf-8") as fh:
                fh.write(block["code"])
        elif block["lang"] == "python":
            code = compile("\\n" * (block["line"] - 1) + block["code"], block["page"], "exec")
            try:
                exec(code, namespace)
            except BaseException:
                traceback.print_exc()
                print("FAILED: the python block at " + where, flush=True)
                sys.exit(1)
            sys.stdout.flush()
            sys.stderr.flush()
        else:
            proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block["code"]])
            if proc.returncode:
                print("FAILED: the shell block at " + where + " (exit status "
                      + str(proc.returncode) + ")", flush=True)
                sys.exit(1)
    print("=== all blocks ran", flush=True)
""")


def example_env() -> dict:
    """The environment of the examples: single-threaded, no GPU, no display."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env.update(
        PATH=bindir + os.pathsep + env.get("PATH", ""),
        MPLBACKEND="Agg",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        TF_NUM_INTRAOP_THREADS="1",
        TF_NUM_INTEROP_THREADS="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        XLA_FLAGS="--xla_cpu_multi_thread_eigen=false",
        CUDA_VISIBLE_DEVICES="",
        PYTHONWARNINGS="ignore::DeprecationWarning",
        NO_MKDOCS_2_WARNING="1",
    )
    return env


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


ALL = {page: extract(page) for page in PAGES}


# -- the jobs: the site, the figures and the pages, run WORKERS at a time --------------
def _build_site(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=PAGE_TIMEOUT, env=example_env())


def _make_figures(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DOCS / "make_figures.py"), "--small",
                           "--out", str(out)], cwd=out, capture_output=True, text=True,
                          timeout=PAGE_TIMEOUT, env=example_env())


def _run_page(page: Path, tmp: Path) -> subprocess.CompletedProcess:
    blocks = [b for b in ALL[page][0] if b.skip is None]
    spec = tmp / "blocks.json"
    spec.write_text(json.dumps([{"page": str(b.page), "line": b.line, "lang": b.lang,
                                 "code": b.code, "file": b.file} for b in blocks]),
                    encoding="utf-8")
    work = tmp / "work"
    work.mkdir()
    return subprocess.run([sys.executable, "-c", RUNNER, str(spec)], cwd=work,
                          capture_output=True, text=True, timeout=PAGE_TIMEOUT,
                          env=example_env())


@pytest.fixture(scope="module")
def jobs(request, tmp_path_factory):
    """Start what the selected tests need, ``WORKERS`` processes at a time (each one
    single-threaded), the longest first; the tests then wait for their own result."""
    names = {getattr(item, "originalname", item.name) for item in request.session.items}
    pages = [item.callspec.params["page"] for item in request.session.items
             if getattr(item, "originalname", None) == "test_page_examples_run"]
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    futures: dict = {}
    if names & {"test_mkdocs_build_strict", "test_api_reference_documents_every_exported_name"}:
        out = tmp_path_factory.mktemp("site")
        futures["site"] = (out, pool.submit(_build_site, out))
    if "test_figures_are_made_by_the_script" in names:
        out = tmp_path_factory.mktemp("figures")
        futures["figures"] = (out, pool.submit(_make_figures, out))
    cost = {page: sum(len(b.code) for b in ALL[page][0] if b.skip is None)
            for page in dict.fromkeys(pages)}
    for page in sorted(cost, key=lambda p: (p.name != "README.md", -cost[p])):
        futures[page] = (None, pool.submit(_run_page, page, tmp_path_factory.mktemp("page")))
    yield futures
    pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="module")
def site(jobs) -> Path:
    out, future = jobs["site"]
    proc = future.result()
    assert proc.returncode == 0, (
        "mkdocs build --strict failed (install the docs tools with pip install -e "
        "'.[docs]'):\n" + proc.stdout[-6000:] + proc.stderr[-6000:])
    return out


def test_mkdocs_build_strict(site):
    assert (site / "index.html").is_file()
    assert (site / "reference" / "specdens" / "index.html").is_file()


def _module_file(modname: str) -> Path:
    """The source of a specdens module (``specdens.backends`` is the ``backends/`` folder)."""
    parts = modname.split(".")
    base = ROOT / "backends" if parts[:2] == ["specdens", "backends"] else ROOT / "specdens"
    rest = parts[2:] if parts[:2] == ["specdens", "backends"] else parts[1:]
    path = base.joinpath(*rest)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _exports(modname: str) -> dict[str, str]:
    """``{name: the anchor its documentation may have}`` for what a module exports (its
    ``__all__``, else its public top-level definitions), read from the source without
    importing it (and so without importing any framework)."""
    tree = ast.parse(_module_file(modname).read_text(encoding="utf-8"))
    package = modname if _module_file(modname).name == "__init__.py" else \
        modname.rsplit(".", 1)[0]
    origin: dict[str, str] = {}
    names: list[str] | None = None
    defined: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level > 1:
                base = base[:len(base) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else [])) if node.level \
                else node.module
            for alias in node.names:
                origin[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name) and t.id == "__all__":
                    names = list(ast.literal_eval(node.value))
                elif isinstance(t, ast.Name) and t.id.isupper():
                    defined.append(t.id)
    if names is None:
        names = [n for n in defined if not n.startswith("_")]
    return {n: origin.get(n, f"{modname}.{n}") for n in names if n != "__version__"}


def test_api_reference_documents_every_exported_name(site):
    anchors: set[str] = set()
    for html in (site / "reference").rglob("*.html"):
        anchors.update(re.findall(r'id="([\w.]+)"', html.read_text(encoding="utf-8")))
    missing = [modname for modname in EXPORTING_MODULES if modname not in anchors]
    for modname in EXPORTING_MODULES:
        for name, source in _exports(modname).items():
            if not {f"{modname}.{name}", source} & anchors:
                missing.append(f"{modname}.{name}")
    assert not missing, f"not in the API reference (docs/reference/*.md): {missing}"


# -- the examples -----------------------------------------------------------------------
def test_skipped_blocks():
    problems = [p for _, (_, probs) in ALL.items() for p in probs]
    skipped = [b for blocks, _ in ALL.values() for b in blocks if b.skip is not None]
    problems += [f"{b.where}: skip marker without a reason (<!-- skip: why -->)"
                 for b in skipped if not b.skip]
    for b in skipped:
        if b.lang == "python":
            try:
                compile(b.code, b.where, "exec")
            except SyntaxError as exc:
                problems.append(f"{b.where}: skipped block does not compile: {exc}")
    print(f"\n{len(skipped)} skipped code blocks:")
    for b in skipped:
        print(f"  {b.where} [{b.lang}]: {b.skip}")
    assert not problems, "\n".join(problems)
    assert len(skipped) <= MAX_SKIPPED, (
        f"{len(skipped)} skipped code blocks (at most {MAX_SKIPPED}): make examples run "
        "instead of skipping them")
    runnable = [b for blocks, _ in ALL.values() for b in blocks if b.skip is None]
    assert len(runnable) >= 30, "the extraction of code blocks found too few to run"


RUNNABLE_PAGES = [p for p, (blocks, _) in ALL.items() if any(b.skip is None for b in blocks)]


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=_page_id)
def test_page_examples_run(page, jobs):
    proc = jobs[page][1].result()
    assert proc.returncode == 0, (
        f"an example of {_page_id(page)} failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-8000:]}")
    assert "=== all blocks ran" in proc.stdout


# -- the figures ------------------------------------------------------------------------
def _shown_figures() -> set[str]:
    shown = set()
    for page in PAGES:
        shown.update(re.findall(r"figures/([\w.-]+\.png)", page.read_text(encoding="utf-8")))
    return shown


def test_figures_are_made_by_the_script(jobs):
    out, future = jobs["figures"]
    proc = future.result()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    made = {p.name for p in out.glob("*.png")}
    shown = _shown_figures()
    assert shown, "no figure found in the docs"
    assert shown <= made, f"shown in the docs but not made by make_figures.py: {shown - made}"
    for name in made:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    missing = [n for n in shown if not (DOCS / "figures" / n).is_file()]
    assert not missing, f"run python docs/make_figures.py to create {missing}"
