"""mkdocs hooks that finish the book's site (loaded by mkdocs.yml: `hooks: [tools/book_hooks.py]`).

mkdocs-jupyter executes every chapter (`book/*.py`, jupytext percent format) and renders it
with nbconvert. Five things are added here:

1. **Chapters run in their own folder.** nbconvert starts the kernel in the current folder,
   which for `mkdocs build` is the repository root. Jupyter, VS Code and nbconvert on a
   notebook start it in the notebook's folder, `book/`; the build does the same here, so a
   chapter runs alike everywhere and imports its helper module (`book/book_helpers.py`) from
   its own folder.
2. **A cache that knows the library.** mkdocs-jupyter caches a rendered chapter under a key
   made of the chapter's text and the plugin options. A chapter's output also depends on the
   code it imports and the results it reads, so the cache lives in a folder named after a
   fingerprint of `mrcnn/`, `kernels/`, `benchmarks/`, `experiments/` (their code and recorded
   results) and the book's helper module: change any of them and every chapter runs again. The
   folder is `build/book-cache/<fingerprint>` (or `$MRCNN_BOOK_CACHE/<fingerprint>`; the tests
   point it at a temporary folder); older fingerprints are deleted.
3. **Offline math.** nbconvert's page template loads MathJax 2 (and mermaid) from a CDN. Those
   tags are removed; the math in chapters is rendered by the KaTeX copy that ships with the
   site (`book/javascripts/math.js`). A chapter page that still loads a script or stylesheet
   from the network is reported as a warning, which fails `mkdocs build --strict`.
4. **Links between pages.** A chapter's markdown is rendered by nbconvert, not by mkdocs, so a
   link such as `[RoIAlign](03_3_roi_align.py)` would keep pointing at the source file. Links
   to another page of the book (a chapter `.py` or a `.md` page) are rewritten to that page's
   URL, as mkdocs does for markdown pages; a link to a page that does not exist is reported
   as a warning, which fails `mkdocs build --strict`.
5. **Downloads.** Next to every chapter page the site holds `<chapter>.py` (copied by
   mkdocs-jupyter's `include_source`) and `<chapter>.ipynb`, written here without outputs;
   the page links both under its title.
6. **Alt text.** nbconvert gives every output picture the same placeholder alt text. The book's
   helper writes each matplotlib figure's own titles into its PNG (a "Description" text chunk,
   `book_helpers.describe_figures`); here that text becomes the `<img>`'s alt. A picture without
   one is described by the heading of the section it sits in.

`execute_chapter` runs one chapter through the same plugin code the build uses, filling the
same cache; tests/test_book.py uses it so that a later site build does not run the chapters
a second time.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html as html_escaping
import logging
import os
import posixpath
import re
import shutil
import struct
import zlib
from pathlib import Path

import jupytext
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

log = logging.getLogger("mkdocs.hooks.book")

CACHE_ENV = "MRCNN_BOOK_CACHE"
# What a chapter's output depends on besides its own text: the code it imports, the results it reads.
CHAPTER_INPUTS = ("mrcnn", "kernels", "benchmarks", "experiments", "book/book_helpers.py")
CHAPTER_INPUT_SUFFIXES = (".py", ".json", ".md")
JUPYTER_PLUGIN = "mkdocs-jupyter"

_MATHJAX_BLOCK = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.DOTALL)
_MERMAID_SCRIPT = re.compile(r"<script type=\"module\">(?:(?!</script>).)*?mermaid(?:(?!</script>).)*</script>", re.DOTALL)
_REMOTE_ASSET = re.compile(r"<(?:script|link)\b[^>]*\b(?:src|href)=[\"'](?:https?:)?//[^\"']+", re.IGNORECASE)
_FIRST_H1_END = re.compile(r"</h1>", re.IGNORECASE)
NBCONVERT_PLACEHOLDER_ALT = "No description has been provided for this image"
_IMG_OR_HEADING = re.compile(r"<img\b[^>]*>|<h([1-6])\b[^>]*>(.*?)</h\1>", re.IGNORECASE | re.DOTALL)
_PNG_DATA = re.compile(r'src="data:image/png;base64,([^"]+)"')
_ALT = re.compile(r'\salt="[^"]*"')
_TAG = re.compile(r"<[^>]+>")
# href="NAME.py" or "NAME.md", with an optional #anchor; not a URL with a scheme, not //host, not #anchor alone
_PAGE_LINK = re.compile(r'href="(?![a-z][a-z0-9+.-]*:|//|#)([^"#?]+\.(?:py|md))(#[^"]*)?"', re.IGNORECASE)


def chapter_input_files(root: Path) -> list[Path]:
    """The files of `CHAPTER_INPUTS` under `root`: each folder's `.py`, `.json` and `.md` files, and the named files."""
    files = []
    for name in CHAPTER_INPUTS:
        path = root / name
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in CHAPTER_INPUT_SUFFIXES)
        elif path.is_file():
            files.append(path)
    return files


def chapter_inputs_fingerprint(root: Path) -> str:
    """A short sha256 of the chapters' inputs under `root` (`chapter_input_files`: path and bytes)."""
    digest = hashlib.sha256()
    for path in chapter_input_files(root):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def _is_chapter(page) -> bool:
    return page.file.src_uri.endswith(".py")


def configure_cache(config) -> None:
    """Point mkdocs-jupyter's cache at `<cache root>/<library fingerprint>`, dropping older ones."""
    plugin = config.plugins.get(JUPYTER_PLUGIN)
    if plugin is None or not plugin.config.get("cache", False):
        return
    root = _root(config)
    cache_root = Path(os.environ.get(CACHE_ENV) or root / "build" / "book-cache")
    cache_dir = cache_root / chapter_inputs_fingerprint(root)
    if cache_root.is_dir():
        for stale in cache_root.iterdir():
            if stale.is_dir() and stale != cache_dir:
                shutil.rmtree(stale, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    plugin.config["cache_dir"] = str(cache_dir)


def on_config(config):
    configure_cache(config)
    return config


@contextlib.contextmanager
def working_directory(path: Path):
    """Within the block, the current folder is `path` (the kernel nbconvert starts inherits it)."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def on_pre_page(page, config, files):
    """Run a chapter in its own folder, as Jupyter does: wrap the render mkdocs-jupyter installed.

    mkdocs runs hooks after the plugins, so `page.render` is already mkdocs-jupyter's, which
    executes the notebook (or reads the cache).
    """
    if _is_chapter(page):
        render = page.render

        def render_in_chapter_folder(config, files):
            with working_directory(Path(page.file.abs_src_path).parent):
                return render(config, files)

        page.render = render_in_chapter_folder
    return page


def _downloads(stem: str) -> str:
    return (
        '<div class="book-downloads">'
        f'<a class="md-button md-button--primary" href="{stem}.ipynb" download>Download notebook (.ipynb)</a> '
        f'<a class="md-button" href="{stem}.py" download>Download source (.py)</a>'
        "</div>"
    )


def rewrite_page_links(html: str, page, files) -> str:
    """`href="03_3_roi_align.py"` in a chapter page -> the URL of that page, relative to this one."""

    def replace(match: re.Match) -> str:
        path = posixpath.normpath(posixpath.join(posixpath.dirname(page.file.src_uri), match.group(1)))
        target = files.get_file_from_path(path)
        if target is None or not target.is_documentation_page():
            log.warning("%s links to %s, which is not a page of the book", page.file.src_uri, match.group(1))
            return match.group(0)
        return f'href="{target.url_relative_to(page.file)}{match.group(2) or ""}"'

    return _PAGE_LINK.sub(replace, html)


def png_text(png: bytes) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG: keyword -> text."""
    texts, at = {}, 8  # after the 8-byte signature: chunks of length, type, data, CRC
    while at + 8 <= len(png):
        length, kind = struct.unpack(">I4s", png[at:at + 8])
        data = png[at + 8:at + 8 + length]
        at += 12 + length
        if kind == b"tEXt":
            key, _, value = data.partition(b"\0")
            texts[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"zTXt":
            key, _, value = data.partition(b"\0")
            texts[key.decode("latin-1")] = zlib.decompress(value[1:]).decode("latin-1")
        elif kind == b"iTXt":
            key, _, rest = data.partition(b"\0")
            compressed, rest = rest[0], rest[2:]  # compression flag and method
            _, _, rest = rest.partition(b"\0")  # language tag
            _, _, value = rest.partition(b"\0")  # translated keyword
            texts[key.decode("latin-1")] = (zlib.decompress(value) if compressed else value).decode("utf-8")
        elif kind == b"IEND":
            break
    return texts


def describe_images(html: str) -> str:
    """Replace nbconvert's placeholder alt text: the figure's own description, else its section's heading."""
    heading = ""

    def replace(match: re.Match) -> str:
        nonlocal heading
        if match.group(1):  # a heading: remember its text for the pictures under it
            heading = " ".join(html_escaping.unescape(_TAG.sub("", match.group(2))).replace("¶", "").split())
            return match.group(0)
        tag = match.group(0)
        if f'alt="{NBCONVERT_PLACEHOLDER_ALT}"' not in tag:
            return tag
        description = ""
        if data := _PNG_DATA.search(tag):
            try:
                description = png_text(base64.b64decode(data.group(1))).get("Description", "")
            except (ValueError, struct.error, zlib.error):
                description = ""
        description = description or (f"A figure of the section “{heading}”" if heading else "A figure of this chapter")
        return _ALT.sub(f' alt="{html_escaping.escape(description, quote=True)}"', tag, count=1)

    return _IMG_OR_HEADING.sub(replace, html)


def on_page_content(html, page, config, files):
    if not _is_chapter(page):
        return html
    html = rewrite_page_links(html, page, files)
    html = describe_images(html)
    html = _MATHJAX_BLOCK.sub("", html)
    html = _MERMAID_SCRIPT.sub("", html)
    for remote in _REMOTE_ASSET.findall(html):
        log.warning("%s loads an asset from the network, which breaks the offline site: %s", page.file.src_uri, remote)
    stem = Path(page.file.src_uri).stem
    match = _FIRST_H1_END.search(html)
    at = match.end() if match else 0
    return html[:at] + _downloads(stem) + html[at:]


def on_post_page(output, page, config):
    if _is_chapter(page):
        notebook = jupytext.read(page.file.abs_src_path)
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        target = Path(page.file.abs_dest_path).parent / f"{Path(page.file.src_uri).stem}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        jupytext.write(notebook, target, fmt="ipynb")
    return output


def execute_chapter(chapter: Path, config) -> str:
    """Execute and render one chapter exactly as `mkdocs build` does (in its own folder); return the page's HTML.

    `config` is the book's loaded mkdocs config (`mkdocs.config.load_config("mkdocs.yml")`).
    Uses mkdocs-jupyter's own page hooks, so the result lands in the same cache the build reads.
    Raises nbclient's `CellExecutionError` (with the cell and the traceback) if a cell fails.
    """
    configure_cache(config)
    plugin = config.plugins[JUPYTER_PLUGIN]
    if hasattr(plugin, "on_pre_build"):  # mkdocs-jupyter versions with a cache keep its bookkeeping there
        plugin.on_pre_build(config=config)
    chapter = Path(chapter).resolve()
    file = File(chapter.relative_to(Path(config.docs_dir).resolve()).as_posix(), config.docs_dir, config.site_dir, config.use_directory_urls)
    files = Files([file])
    page = Page(None, file, config)
    plugin.on_pre_page(page, config=config, files=files)
    on_pre_page(page, config, files)
    page.render(config, files)
    return page.content
