// What breaks the look of the view on screen, as sentences (tests/test_miniapp_look.py):
// sideways scrolling, anything wider than the screen, a section on the page's own colour, text
// spilling out of its box or over other text, a clipped tab label, a tap target under 44 px.
() => {
  const problems = [];
  const width = window.innerWidth;
  const root = document.documentElement;
  if (root.scrollWidth > width) problems.push("page scrolls sideways: " + root.scrollWidth);
  const view = document.querySelector("[data-view]:not([hidden])");
  const visible = (el) => el.offsetParent !== null || getComputedStyle(el).position === "fixed";
  const page = getComputedStyle(document.body).backgroundColor;
  for (const el of view.querySelectorAll("*")) {
    if (!visible(el)) continue;
    const box = el.getBoundingClientRect();
    if (box.width && box.right > width + 0.5) problems.push("wider than the screen: " + el.id + " " + el.className + " " + Math.round(box.right));
  }
  for (const card of view.querySelectorAll(".card, .item, .message-assistant")) {
    if (!visible(card)) continue;
    if (getComputedStyle(card).backgroundColor === page) problems.push("a section on the page's colour: " + (card.id || card.className));
  }
  for (const el of view.querySelectorAll("*")) {
    if (!visible(el) || el.children.length || !el.textContent.trim() || /^(INPUT|SELECT|TEXTAREA|OPTION)$/.test(el.tagName)) continue;
    if (el.scrollWidth > el.clientWidth + 1) problems.push("text spills out of its box: " + el.textContent.slice(0, 40));
  }
  const overlap = (a, b) => a.left < b.right - 0.5 && b.left < a.right - 0.5 && a.top < b.bottom - 0.5 && b.top < a.bottom - 0.5;
  for (const pair of view.querySelectorAll(".facts, .item-head")) {
    const parts = Array.from(pair.children).filter(visible).map((el) => [el, el.getBoundingClientRect()]);
    for (let i = 0; i < parts.length; i++) for (let j = i + 1; j < parts.length; j++) {
      if (overlap(parts[i][1], parts[j][1])) problems.push("words on words: " + parts[i][0].textContent + " / " + parts[j][0].textContent);
    }
  }
  for (const tab of document.querySelectorAll("nav.tabs a:not([hidden])")) {
    const label = tab.querySelector(".tab-label");
    if (label.scrollWidth > label.clientWidth + 0.5 || tab.scrollWidth > tab.clientWidth + 0.5) problems.push("tab text clipped: " + label.textContent);
    if (tab.getBoundingClientRect().height < 44) problems.push("tab under 44 px: " + label.textContent);
  }
  for (const el of view.querySelectorAll("button, a, .chip, summary, input, select, textarea")) {
    if (!visible(el)) continue;
    const box = el.getBoundingClientRect();
    if (box.height < 44 - 0.5) problems.push("target under 44 px: " + (el.id || el.className || el.tagName) + " " + Math.round(box.height));
  }
  for (const list of view.querySelectorAll("[role=tablist]")) {
    for (const tab of list.children) {
      if (tab.getAttribute("role") !== "tab" || !tab.hasAttribute("aria-selected")) problems.push("a tab list's child is not a tab: " + tab.textContent);
    }
  }
  return problems;
}
