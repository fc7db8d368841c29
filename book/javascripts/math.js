// Render the book's math with the KaTeX copy shipped in javascripts/vendor/katex (no CDN).
//
// Two kinds of page carry math:
// - markdown pages (index, API reference): pymdownx.arithmatex (generic mode) wraps it in
//   .arithmatex elements as \( ... \) and \[ ... \];
// - notebook pages (the chapters, rendered by mkdocs-jupyter through nbconvert): the
//   markdown cells keep the author's $ ... $ and $$ ... $$ as text inside .jp-RenderedMarkdown.
// auto-render skips <pre> and <code>, so code cells and printed output are never touched.
// A formula KaTeX cannot parse is shown in red with the error as its tooltip (.katex-error),
// which the browser test looks for.

(function () {
  "use strict";

  var environments = ["equation", "equation*", "align", "align*", "gather", "gather*", "alignat", "alignat*", "CD"];
  function environmentDelimiters() {
    return environments.map(function (name) {
      return { left: "\\begin{" + name + "}", right: "\\end{" + name + "}", display: true };
    });
  }

  var arithmatexOptions = {
    delimiters: [
      { left: "\\[", right: "\\]", display: true },
      { left: "\\(", right: "\\)", display: false },
    ],
    throwOnError: false,
  };

  var notebookOptions = {
    delimiters: [
      { left: "$$", right: "$$", display: true },
      { left: "\\[", right: "\\]", display: true },
      { left: "$", right: "$", display: false },
      { left: "\\(", right: "\\)", display: false },
    ].concat(environmentDelimiters()),
    throwOnError: false,
  };

  function renderMath(root) {
    if (typeof renderMathInElement !== "function") {
      console.error("math.js: KaTeX auto-render is not loaded; math is left as TeX");
      return;
    }
    root.querySelectorAll(".arithmatex").forEach(function (element) {
      renderMathInElement(element, arithmatexOptions);
    });
    root.querySelectorAll(".jupyter-wrapper .jp-RenderedMarkdown").forEach(function (element) {
      renderMathInElement(element, notebookOptions);
    });
  }

  // A display equation wider than the column is set smaller, down to 80% of its size, so that it
  // fits; one still wider scrolls sideways in its own box, whose scrollbar stays visible
  // (book.css), instead of looking cut off at the right.
  var SMALLEST = 0.8;
  function fitWideEquations(root) {
    root.querySelectorAll(".katex-display").forEach(function (display) {
      display.style.fontSize = "";
      var ratio = display.clientWidth / display.scrollWidth;
      if (ratio < 1) {
        display.style.fontSize = Math.max(SMALLEST, Math.floor(ratio * 97) / 100) + "em";  // 3% to spare
      }
      display.classList.toggle("book-math-scrolls", display.scrollWidth > display.clientWidth + 1);
    });
  }

  function renderPage(root) {
    renderMath(root);
    fitWideEquations(root);
    if (document.fonts) {  // KaTeX's fonts change the widths once they have loaded
      document.fonts.ready.then(function () {
        fitWideEquations(root);
      });
    }
  }

  var resizing = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizing);
    resizing = setTimeout(function () {
      fitWideEquations(document.body);
    }, 200);
  });

  // mkdocs-material announces every page it shows (also after instant navigation) on document$.
  if (typeof document$ !== "undefined") {
    document$.subscribe(function (page) {
      renderPage(page.body || document.body);
    });
  } else {
    document.addEventListener("DOMContentLoaded", function () {
      renderPage(document.body);
    });
  }
})();
