"""The book: every chapter runs, every paper section has its chapter, the site lists them in order.

Chapters are jupytext percent scripts, `book/<name>.py`, with fixed names (below), next to
their helper module `book/book_helpers.py`. Each one is executed here exactly as `mkdocs build`
executes it (mkdocs-jupyter's own code: jupytext -> nbconvert's nbclient-based executor -> the
`python3` kernel of this Python), in `book/` as Jupyter runs a notebook (tools/book_hooks.py
starts the kernel there, whatever folder the build runs in), with `TRITON_INTERPRET` removed
from the environment as it is for `make book-build`. A chapter that prints that a file it reads
is not there fails. The rendered pages land in the build's cache, so tests/test_site.py, later
in the same session, builds the site without running the chapters again.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import re
import shutil
import subprocess
import sys
import textwrap
import time
from html.parser import HTMLParser
from pathlib import Path

import jupytext
import pytest
import yaml
from jupyter_client.kernelspec import KernelSpecManager
from mkdocs.config import load_config
from mkdocs.structure.files import File, Files, get_files, set_exclusions
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
CHAPTER_TIMEOUT_S = 180
HELPERS = ["book_helpers.py"]  # imported by the chapters, not a page of the site

# The chapters, in the paper's order. The names are fixed; a chapter is "present" once its file exists.
CHAPTERS = [
    "01_introduction.py",
    "02_related_work.py",
    "03_1_faster_rcnn.py",
    "03_2_mask_representation.py",
    "03_3_roi_align.py",
    "03_4_network_architecture.py",
    "03_5_training.py",
    "03_6_inference.py",
    "04_1_main_results.py",
    "04_2_ablations.py",
    "04_3_box_detection_and_timing.py",
    "05_human_pose.py",
    "07_fine_tuning.py",
    "06_inspecting.py",
    "appendix_kernels.py",
]

# Every section of the paper and the chapter that reads it: (section number, words that name
# it, chapter). The chapter's place in the nav (its group and its title) must say both.
PAPER_SECTIONS = [
    ("1", "Introduction", "01_introduction.py"),
    ("2", "Related work", "02_related_work.py"),
    ("3", "Faster R-CNN", "03_1_faster_rcnn.py"),
    ("3", "Mask representation", "03_2_mask_representation.py"),
    ("3", "RoIAlign", "03_3_roi_align.py"),
    ("3", "Network architecture", "03_4_network_architecture.py"),
    ("3.1", "Training", "03_5_training.py"),
    ("3.1", "Inference", "03_6_inference.py"),
    ("4.1", "Main results", "04_1_main_results.py"),
    ("4.2", "Ablations", "04_2_ablations.py"),
    ("4.3", "Box detection", "04_3_box_detection_and_timing.py"),
    ("4.4", "Timing", "04_3_box_detection_and_timing.py"),
    ("5", "Human pose", "05_human_pose.py"),
    ("Appendix", "kernels", "appendix_kernels.py"),
]

PRESENT = [name for name in CHAPTERS if (BOOK / name).is_file()]
MISSING = [name for name in CHAPTERS if name not in PRESENT]


def _load_book_hooks():
    spec = importlib.util.spec_from_file_location("book_hooks", ROOT / "tools" / "book_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _yaml_load(path: Path) -> dict:
    class Loader(yaml.SafeLoader):
        """Ignores tags such as !!python/name:... that mkdocs.yml may hold."""

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    return yaml.load(path.read_text(), Loader=Loader)


def nav_entries(nav, groups=()) -> list[tuple[tuple[str, ...], str, str]]:
    """(group titles, title, file relative to book/) for every page of the nav, in order."""
    entries = []
    for entry in nav or []:
        if isinstance(entry, str):
            entries.append((groups, "", entry))
            continue
        for title, value in entry.items():
            if isinstance(value, str):
                entries.append((groups, str(title), value))
            else:
                entries.extend(nav_entries(value, groups + (str(title),)))
    return entries


@pytest.fixture(scope="module")
def nav() -> list[tuple[tuple[str, ...], str, str]]:
    config = _yaml_load(ROOT / "mkdocs.yml")
    assert config.get("docs_dir", "docs") == "book"
    return nav_entries(config.get("nav"))


# ----------------------------------------------------------------------------------------
# The map: files, nav, index


def test_chapter_files_have_the_planned_names():
    unexpected = sorted(path.name for path in BOOK.glob("*.py") if path.name not in CHAPTERS + HELPERS)
    assert not unexpected, f"book/ holds .py files that are not chapters {CHAPTERS}: {unexpected}"


def test_the_helper_module_is_not_a_page(mkdocs_config):
    """mkdocs-jupyter makes every `*.py` of book/ a page; mkdocs.yml's exclude_docs leaves the helpers out."""
    files = get_files(mkdocs_config)
    files = mkdocs_config.plugins[JUPYTER_PLUGIN_NAME].on_files(files, config=mkdocs_config) or files  # as the build
    set_exclusions(files, mkdocs_config)
    pages = {file.src_uri for file in files.documentation_pages()}
    assert set(PRESENT) <= pages
    assert not pages & set(HELPERS), f"helper modules rendered as pages: {sorted(pages & set(HELPERS))}"
    assert not [file.src_uri for file in files if file.inclusion.is_included() and "__pycache__" in file.src_uri]


def test_nav_lists_every_chapter_file_and_only_files_that_exist(nav):
    listed = [file for _, _, file in nav]
    missing_files = [file for file in listed if not (BOOK / file).is_file()]
    assert not missing_files, f"mkdocs.yml's nav lists files that do not exist in book/: {missing_files}"
    duplicates = sorted({file for file in listed if listed.count(file) > 1})
    assert not duplicates, f"listed twice in the nav: {duplicates}"
    unlisted = [name for name in PRESENT if name not in listed]
    assert not unlisted, f"chapters missing from mkdocs.yml's nav (uncomment their line): {unlisted}"
    assert listed[0] == "index.md", "the nav starts with the home page"
    api_pages = [file for file in listed if file.startswith("api/")]
    assert api_pages, "the nav lists the API reference (book/api/*.md)"


def test_nav_follows_the_papers_order(nav):
    chapters_in_nav = [file for _, _, file in nav if file in CHAPTERS]
    assert chapters_in_nav == [name for name in CHAPTERS if name in chapters_in_nav], chapters_in_nav


def test_present_chapters_sit_under_their_paper_section(nav):
    """Each present chapter's nav group and title name its paper section: number and words."""
    place = {file: " / ".join(groups + (title,)) for groups, title, file in nav}
    wrong = []
    for number, words, chapter in PAPER_SECTIONS:
        if chapter not in PRESENT:
            continue
        label = place.get(chapter, "")
        number_named = re.search(rf"(?<![\d.]){re.escape(number)}(?![\d.]*\d)", label, re.IGNORECASE)
        if not (number_named and words.lower() in label.lower()):
            wrong.append(f"{chapter} is at {label!r}, which should name '{number}' and '{words}'")
    assert not wrong, "\n".join(wrong)


def test_every_paper_section_has_a_chapter(nav):
    listed = {file for _, _, file in nav}
    without = [f"{number} {words} ({chapter})" for number, words, chapter in PAPER_SECTIONS if chapter not in listed]
    assert not without, f"paper sections without a chapter in the nav: {without}"
    assert not MISSING, f"chapters not written: {MISSING}"


def test_index_links_every_present_chapter_and_maps_every_section():
    index = (BOOK / "index.md").read_text()
    unlinked = [name for name in PRESENT if f"]({name})" not in index]
    assert not unlinked, f"book/index.md's map does not link these chapters: {unlinked}"
    table = [line for line in index.splitlines() if line.startswith("| ")]
    for number, words, _ in PAPER_SECTIONS:
        pattern = re.compile(rf"^\|[^|]*\b{re.escape(number)}\b[^|]*\|", re.IGNORECASE)
        rows = [row for row in table if pattern.search(row) and words.split()[0].lower() in row.lower()]
        assert rows, f"book/index.md's map has no row for section {number} {words}"
    for row in table:
        if any(f"]({name})" in row for name in PRESENT):
            absent = [p for p in re.findall(r"`((?:mrcnn|kernels|tests|benchmarks)/[\w./-]*)`", row) if not (ROOT / p).exists()]
            assert not absent, f"book/index.md's map names files that do not exist: {absent} in {row[:60]}..."
    for letter in ["N", "C", "H x W", "A", "R", "K", "P", "M", "G", "D"]:
        assert f"| {letter} |" in index, f"the dimension legend lacks {letter}"
    for command in ["make demo", "make test", "make book"]:
        assert command in index


# ----------------------------------------------------------------------------------------
# Each chapter: its shape, then a full run


def _cells(chapter: str):
    return jupytext.read(BOOK / chapter).cells


@pytest.mark.parametrize("chapter", PRESENT)
def test_chapter_follows_the_house_plan(chapter):
    """Opens with the paper section, module and tests (all real files); shows real code; ends with ideas."""
    cells = _cells(chapter)
    opening = cells[0]
    assert opening.cell_type == "markdown", f"{chapter} must open with a markdown cell"
    assert re.match(r"#\s+\S", opening.source.lstrip()), f"{chapter} must open with a '# Title' heading"
    assert re.search(r"section|appendix", opening.source, re.IGNORECASE), f"{chapter}'s opening names no paper section"
    paths = set(re.findall(r"\b((?:mrcnn|kernels|tests|benchmarks)/[\w./-]*\w)", opening.source))
    assert any(not p.startswith("tests/") for p in paths), f"{chapter}'s opening names no module (mrcnn/..., kernels/...)"
    assert any(p.startswith("tests/") for p in paths), f"{chapter}'s opening names no tests (tests/...)"
    absent = sorted(p for p in paths if not (ROOT / p).exists())
    assert not absent, f"{chapter}'s opening names files that do not exist: {absent}"
    code = "\n".join(cell.source for cell in cells if cell.cell_type == "code")
    assert "show_source(" in code, f"{chapter} must show the library's code with book_helpers.show_source"
    headings = [line for cell in cells if cell.cell_type == "markdown" for line in cell.source.splitlines()]
    assert any(re.match(r"#+\s+What to try next", line) for line in headings), f"{chapter} must end with 'What to try next'"


# ----------------------------------------------------------------------------------------
# The code on a page fits its content column: no line scrolls sideways

# The content column holds code lines of about 130 characters at a 1280 px window (book/stylesheets/,
# measured by tests/test_site.py); 120 leaves the code block its padding.
CODE_WIDTH = 120
@pytest.mark.parametrize("chapter", PRESENT)
def test_code_cells_fit_the_content_column(chapter):
    """No line of a code cell is wider than CODE_WIDTH; the markdown cells are prose, which wraps."""
    too_wide = [f"{len(line)}: {line.strip()[:80]}" for cell in _cells(chapter) if cell.cell_type == "code"
                for line in cell.source.splitlines() if len(line) > CODE_WIDTH]  # fmt: skip
    assert not too_wide, f"{chapter} has code lines wider than {CODE_WIDTH} characters (wrap them):\n" + "\n".join(too_wide)


def shown_objects(chapter: str) -> list[tuple[str, object]]:
    """(argument as written, object) for every argument of every `show_source(...)` call of a chapter, found
    without running the chapter: a name is looked up through the chapter's own imports (`from X import Y as Z`,
    `import X.Y as Z`), then down its attributes. A starred name (`show_source(*jitted)`) is the value of the
    chapter's assignment to it, evaluated with the chapter's imported names only. An argument that cannot be
    found so raises a `LookupError`: what a page shows must be checkable."""
    tree = ast.parse((BOOK / chapter).read_text())
    imported: dict[str, tuple[str, str | None]] = {}  # name -> (module, attribute of it or None)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.update({alias.asname or alias.name: (node.module, alias.name) for alias in node.names})
        elif isinstance(node, ast.Import):
            for alias in node.names:
                module = alias.name if alias.asname else alias.name.partition(".")[0]  # `import a.b` binds a
                imported[alias.asname or module] = (module, None)
    assigned = {target.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                for target in node.targets if isinstance(target, ast.Name)}  # fmt: skip

    def look_up(name: str):
        if name not in imported:
            raise LookupError(f"{chapter} shows {name!r}, which it does not import")
        module, attribute = imported[name]
        if attribute is None:
            return importlib.import_module(module)
        try:
            return getattr(importlib.import_module(module), attribute)
        except AttributeError:  # `from package import submodule`
            return importlib.import_module(f"{module}.{attribute}")

    def resolve(node: ast.expr):
        if isinstance(node, ast.Name):
            return look_up(node.id)
        if isinstance(node, ast.Attribute):
            return getattr(resolve(node.value), node.attr)
        raise LookupError(f"{chapter}: show_source({ast.unparse(node)}) cannot be resolved without running the chapter")

    shown = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "show_source"):
            continue
        for argument in node.args:
            if isinstance(argument, ast.Starred) and getattr(argument.value, "id", None) in assigned:
                value = assigned[argument.value.id]
                names = {n.id: look_up(n.id) for n in ast.walk(value) if isinstance(n, ast.Name) and n.id in imported}
                shown += [(f"*{argument.value.id}", obj) for obj in eval(compile(ast.Expression(value), chapter, "eval"), names)]
            else:
                shown.append((ast.unparse(argument), resolve(argument)))
    return shown


@pytest.mark.parametrize("chapter", PRESENT)
def test_shown_source_fits_the_content_column(chapter, monkeypatch):
    """No line of the code a chapter shows with `show_source` (whole objects, dedented as shown) is wider than
    CODE_WIDTH."""
    monkeypatch.syspath_prepend(str(BOOK))  # the chapters import book_helpers from their folder ...
    monkeypatch.syspath_prepend(str(ROOT))  # ... and benchmarks/ from the checkout
    shown = shown_objects(chapter)
    assert shown, f"{chapter} shows no code with show_source"
    too_wide = []
    for expression, obj in shown:
        lines, first = inspect.getsourcelines(obj)
        path = Path(inspect.getsourcefile(inspect.unwrap(obj))).resolve()
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        wide = [f"  {where}:{first + index}: {len(line)} characters"
                for index, line in enumerate(textwrap.dedent("".join(lines)).splitlines()) if len(line) > CODE_WIDTH]  # fmt: skip
        if wide:
            too_wide.append(f"show_source({expression}):\n" + "\n".join(wide))
    assert not too_wide, f"{chapter} shows lines wider than {CODE_WIDTH} characters (rewrap them):\n" + "\n".join(too_wide)


def test_a_piece_of_shown_source_is_found_by_its_markers():
    """`show_source(obj, start=..., stop=...)` shows the lines from one marker to the next, as they are in the
    file; a marker that no longer finds its line, or finds several, is an error, not another piece."""
    spec = importlib.util.spec_from_file_location("book_helpers", BOOK / "book_helpers.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    from mrcnn.boxes import box_iou, nms

    lines = inspect.getsource(nms).splitlines()
    head = helpers.source(nms, stop="threshold_low = float(")
    end = next(i for i, line in enumerate(lines) if "threshold_low = float(" in line)
    assert head.splitlines() == lines[: end + 1]
    loop = helpers.source(nms, start="alive = torch.ones")
    start = next(i for i, line in enumerate(lines) if "alive = torch.ones" in line)
    assert loop.splitlines() == textwrap.dedent("\n".join(lines[start:])).splitlines()
    assert loop.startswith("alive = torch.ones")
    assert helpers.source(nms, start="alive = torch.ones", stop="alive = torch.ones").count("\n") == 1  # one line
    with pytest.raises(ValueError, match="6 lines"):
        helpers.source(nms, start="threshold_low")
    with pytest.raises(ValueError, match="no line"):
        helpers.source(nms, stop="a line that is not there")
    with pytest.raises(ValueError, match="one object"):
        helpers.show_source(nms, box_iou, start="alive")


# ----------------------------------------------------------------------------------------
# The prose says only what the page shows: figures come from the page or a results file


def prose_sentences(chapter: str) -> list[str]:
    """The sentences of a chapter's markdown cells, without inline code, math and references to
    chapters, sections, tables and figures ("section 3.1", "Table 2c" name places, not figures)."""
    sentences = []
    for cell in _cells(chapter):
        if cell.cell_type != "markdown":
            continue
        text = re.sub(r"`[^`]*`|\$\$.*?\$\$|\$[^$]*\$", " ", cell.source, flags=re.DOTALL)
        text = re.sub(r"\b(?:chapters?|sections?|tables?|figures?|eq\.)\s+\d+(?:\.\d+)*[a-e]?", " ", text, flags=re.IGNORECASE)
        sentences += [" ".join(s.split()) for s in re.split(r"(?<=[.!?;])\s+(?=[A-Z(*])|\n\s*\n|\n- ", text) if s.strip()]
    return sentences


# A figure in words or digits: 66, 0.72, 2,000, ten, a thousand
FIGURE = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?!\w)|\b(?:ten|twenty|thirty|forty|fifty|hundreds?|thousands?|dozens?)\b",
                    re.IGNORECASE)  # fmt: skip
# Chapters whose owners have yet to move a typed figure of the demo out of their prose
DEMO_FIGURES_TYPED: dict[str, str] = {}


@pytest.mark.parametrize(
    "chapter",
    [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=DEMO_FIGURES_TYPED[name])) if name in DEMO_FIGURES_TYPED
     else name for name in PRESENT],
)  # fmt: skip
def test_prose_types_no_figure_of_the_demo(chapter):
    """The demo's AP, time, steps or data size, wherever the book gives them, are printed by a cell from
    experiments/results/demo.json (book_helpers.demo_results) or mrcnn/demo.py's DEMO_DEFAULTS: one place,
    so the prose cannot contradict the measured run (it once said "about 50%" and "66" on one page)."""
    typed = [s for s in prose_sentences(chapter) if re.search(r"\bdemo", s, re.IGNORECASE) and FIGURE.search(s)]
    assert not typed, f"{chapter} types figures of the demo in its prose; print them from demo_results():\n" + "\n".join(typed)


def test_ablation_prose_types_no_figure_of_ours():
    """Chapter 4.2 reads experiments/results/ablations.json, which a new sweep replaces: a decimal figure in its
    prose must be the paper's (its sentence names the paper, COCO or a table), never one of our runs."""
    decimal = re.compile(r"(?<![\w.])[+-]?\d+\.\d+(?!\w)")
    ours = [s for s in prose_sentences("04_2_ablations.py") if decimal.search(s) and not re.search(r"paper|COCO|Table", s)]
    assert not ours, "chapter 4.2 types measured figures in its prose; compute them in a cell:\n" + "\n".join(ours)


def test_demo_results_are_one_recorded_run():
    """experiments/results/demo.json, the one place of the demo's figures: a finished run of the demo's settings."""
    record = json.loads((ROOT / "experiments" / "results" / "demo.json").read_text())
    from mrcnn.demo import DEMO_DEFAULTS

    report = record["report"]
    assert report["status"] == "finished" and re.fullmatch(r"[0-9a-f]{40}", record["code_commit"])
    assert 0 < report["mask_AP"] <= 1 and 0 < report["box_AP"] <= 1
    arguments = report["arguments"]
    assert report["steps"] == arguments["iterations"] == DEMO_DEFAULTS["iterations"]
    for key in ("num_train", "num_val", "batch_size", "lr", "warmup", "clip_grad_norm"):
        assert arguments[key] == DEMO_DEFAULTS[key], key


def test_links_between_chapters_point_at_pages_not_sources(mkdocs_config, caplog):
    """nbconvert leaves `[x](03_3_roi_align.py)` as it is; the hook makes it the chapter's page URL."""
    hooks = _load_book_hooks()
    names = ["index.md", "01_introduction.py", "03_3_roi_align.py", "api/mrcnn.md"]
    files = Files([File(name, str(BOOK), mkdocs_config.site_dir, True) for name in names])
    files = mkdocs_config.plugins[JUPYTER_PLUGIN_NAME].on_files(files, config=mkdocs_config) or files  # .py: pages
    page = type("Page", (), {"file": files.get_file_from_path("01_introduction.py")})()
    html = ('<a href="03_3_roi_align.py#the-kernel">a</a> <a href="api/mrcnn.md">b</a> '
            '<a href="https://example.org/x.py">c</a> <a href="#top">d</a> <a href="missing.py">e</a>')
    rewritten = hooks.rewrite_page_links(html, page, files)
    assert 'href="../03_3_roi_align/#the-kernel"' in rewritten and 'href="../api/mrcnn/"' in rewritten
    assert 'href="https://example.org/x.py"' in rewritten and 'href="#top"' in rewritten
    assert 'href="missing.py"' in rewritten and "missing.py, which is not a page" in caplog.text


def test_notebook_kernel_is_this_python():
    """`python3`, the kernel the chapters name, starts this very interpreter (the project's venv)."""
    argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    # jupyter_client starts sys.executable for the bare names; anything else must be this Python.
    assert argv0 in {"python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}"} or Path(argv0).resolve() == Path(sys.executable).resolve()


JUPYTER_PLUGIN_NAME = "mkdocs-jupyter"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@pytest.fixture(scope="module")
def mkdocs_config():
    return load_config(str(ROOT / "mkdocs.yml"))


# What a chapter prints when a file it reads (a recorded result) is missing
MISSING_FILE = re.compile(r"not there|not recorded|to record them|no profile recorded|no such file", re.IGNORECASE)
VOID_ELEMENTS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class OutputText(HTMLParser):
    """The text of a rendered chapter's outputs (what its cells printed and displayed), not its code or prose."""

    def __init__(self, html: str):
        super().__init__()
        self.depth, self.parts = 0, []  # depth: how many open elements deep inside an output
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        if tag in VOID_ELEMENTS:
            return
        if self.depth:
            self.depth += 1
        elif "jp-OutputArea-output" in (dict(attrs).get("class") or "").split():
            self.depth = 1

    def handle_endtag(self, tag):
        if self.depth and tag not in VOID_ELEMENTS:
            self.depth -= 1
            if not self.depth:
                self.parts.append("\n")

    def handle_data(self, data):
        if self.depth:
            self.parts.append(data)

    @property
    def text(self) -> str:
        return "".join(self.parts)


def test_output_text_reads_outputs_only():
    html = ('<div class="jp-InputArea"><pre>print("x is not there")</pre></div>'
            '<div class="jp-RenderedText jp-OutputArea-output"><pre>results.json is not there<br>, run it</pre></div>'
            '<div class="jp-RenderedMarkdown jp-OutputArea-output"><p>(run it <img src="a.png"> to record them)</p></div>'
            '<p>prose: not there</p>')  # fmt: skip
    text = OutputText(html).text
    assert text == "results.json is not there, run it\n(run it  to record them)\n"
    assert len(MISSING_FILE.findall(text)) == 2


@pytest.fixture(scope="session")
def books_trained_model():
    """The book's trained model (book_helpers.trained_shapes_model), trained before the chapters run.

    On a fresh checkout the first chapter that needs it would train it, minutes of work once
    (then kept in runs/book/): here it is done by the fixture, so that the chapter's own time
    limit measures the chapter. The tests' timeout does not count fixtures (func_only).
    """
    spec = importlib.util.spec_from_file_location("book_helpers", BOOK / "book_helpers.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    started = time.monotonic()
    helpers.trained_shapes_model()
    print(f"\nthe book's model ready in {time.monotonic() - started:.0f} s")


@pytest.mark.slow
@pytest.mark.timeout(CHAPTER_TIMEOUT_S, func_only=True)
@pytest.mark.parametrize("chapter", PRESENT)
def test_chapter_runs(chapter, books_trained_model, mkdocs_config, monkeypatch, tmp_path_factory, tmp_path):
    """The chapter runs top to bottom in book/, without an error and with every file it reads, and draws a figure."""
    hooks = _load_book_hooks()
    monkeypatch.chdir(tmp_path)  # anywhere: the chapter runs in book/ all the same, as in Jupyter
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as for `make book-build`: a chapter sets what it needs
    monkeypatch.setenv(hooks.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "book-cache"))  # shared with test_site.py
    started = time.monotonic()
    try:
        html = hooks.execute_chapter(BOOK / chapter, mkdocs_config)
    except CellExecutionError as error:  # the failing cell and its traceback, without terminal colours
        pytest.fail(f"{chapter} fails:\n{ANSI_ESCAPE.sub('', str(error))}", pytrace=False)
    seconds = time.monotonic() - started
    assert "jp-Cell" in html
    missing = [line for line in OutputText(html).text.splitlines() if MISSING_FILE.search(line)]
    assert not missing, f"{chapter} misses files it reads:\n" + "\n".join(missing)
    assert re.search(r"<img[^>]+src=\"data:image/(png|svg|jpeg)", html), f"{chapter} draws no figure"
    stderr = re.findall(r'data-mime-type="application/vnd\.jupyter\.stderr"[^>]*>\s*<pre>(.{0,200})', html, re.DOTALL)
    assert not stderr, f"{chapter} writes to stderr (a pink block on the page):\n" + "\n".join(stderr)
    assert str(ROOT) not in html, f"{chapter} prints the checkout's absolute path {ROOT} (print paths relative to it)"
    print(f"{chapter}: executed and rendered in {seconds:.1f} s")


# ----------------------------------------------------------------------------------------
# No notebook is committed with outputs


def test_no_committed_notebook_carries_outputs():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "*.ipynb"], cwd=ROOT, capture_output=True, text=True, check=True)
    with_outputs = []
    for name in listed.stdout.split():
        notebook = json.loads((ROOT / name).read_text())
        for cell in notebook.get("cells", []):
            if cell.get("outputs") or cell.get("execution_count") is not None:
                with_outputs.append(name)
                break
    assert not with_outputs, f"committed notebooks with outputs (clear them, or better keep only the .py): {with_outputs}"
