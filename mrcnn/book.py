"""Helpers for the book's notebooks: show the library's real code, never a pasted copy."""

from __future__ import annotations

import inspect
import textwrap


def source(obj) -> str:
    """The source code of a function, class or module, dedented."""
    return textwrap.dedent(inspect.getsource(obj))


def show_source(*objects) -> None:
    """Display the source of each object as a highlighted Python block in a notebook.

    Outside a notebook (plain `python book/chapter.py`) it prints the code instead.
    """
    text = "\n\n".join(source(obj) for obj in objects)
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:  # pragma: no cover - IPython is installed with the notebook tools
        print(text)
        return
    if get_ipython() is None:
        print(text)
    else:
        display(Markdown(f"```python\n{text}\n```"))
