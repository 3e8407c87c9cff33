// Markdown for chat replies, safely: paragraphs, ``` code blocks ```, `code`, **bold** and
// *italic*, built as DOM nodes from text. Nothing a model writes is ever parsed as HTML.
(function () {
  "use strict";
  const C = window.Cocoon;
  if (!C.ready) return;

  function inline(parent, text) {
    const pattern = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*[^*\n]+\*)/g;
    let last = 0;
    for (const match of text.matchAll(pattern)) {
      if (match.index > last) parent.append(text.slice(last, match.index));
      const token = match[0];
      let node;
      if (token.startsWith("`")) {
        node = document.createElement("code");
        node.textContent = token.slice(1, -1);
      } else if (token.startsWith("**")) {
        node = document.createElement("strong");
        node.textContent = token.slice(2, -2);
      } else {
        node = document.createElement("em");
        node.textContent = token.slice(1, -1);
      }
      parent.append(node);
      last = match.index + token.length;
    }
    if (last < text.length) parent.append(text.slice(last));
  }

  function markdown(element, text) {
    element.textContent = "";
    const parts = text.split(/```[^\n]*\n?/);
    parts.forEach((part, index) => {
      if (index % 2 === 1) {
        const pre = document.createElement("pre");
        const code = document.createElement("code");
        code.textContent = part.replace(/\n$/, "");
        pre.append(code);
        element.append(pre);
        return;
      }
      for (const paragraph of part.split(/\n{2,}/)) {
        if (!paragraph.trim()) continue;
        const p = document.createElement("p");
        inline(p, paragraph);
        element.append(p);
      }
    });
  }

  C.markdown = markdown;
})();
