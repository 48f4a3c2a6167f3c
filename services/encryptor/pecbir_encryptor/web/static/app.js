// The radiologist's view: keyboard navigation, overlays, the cloud view, the study preview.
// Plain JS, no framework, nothing loaded from elsewhere.
"use strict";
(function () {
  const body = document.body;
  const tiles = () => Array.from(document.querySelectorAll(".tile"));

  function toggle(cls, on) {
    body.classList.toggle(cls, on);
    if (cls === "cloud-view" && on) {
      // the hits' cipher images are fetched only when asked for
      document.querySelectorAll("img.cloud[data-src]").forEach((img) => {
        img.src = img.dataset.src;
        img.removeAttribute("data-src");
      });
    }
  }
  const outline = document.getElementById("toggle-outline");
  const cloud = document.getElementById("toggle-cloud");
  if (outline) outline.addEventListener("change", () => toggle("no-outline", !outline.checked));
  if (cloud) cloud.addEventListener("change", () => toggle("cloud-view", cloud.checked));

  // the stored-study preview, and choosing the "stored study" source when a study is picked
  const study = document.getElementById("study");
  const preview = document.getElementById("study-preview");
  if (study && preview) {
    study.addEventListener("change", () => {
      const [collection, id] = study.value.split(":");
      preview.src = "/ui/studies/" + collection + "/" + id + ".png";
      preview.hidden = false;
      document.getElementById("from-study").checked = true;
    });
  }
  ["image", "mask"].forEach((name) => {
    const input = document.getElementById(name);
    if (input) input.addEventListener("change", () => { document.getElementById("from-upload").checked = true; });
  });

  const zoom = document.getElementById("zoom");
  function enlarge(tile) {
    const plain = tile.querySelector("img.plain");
    if (!zoom || !plain) return;
    document.getElementById("zoom-img").src = plain.src;
    const line = tile.querySelector("img.outline");
    document.getElementById("zoom-outline").src = line ? line.src : "";
    document.getElementById("zoom-caption").textContent = tile.getAttribute("aria-label");
    zoom.showModal();
  }
  tiles().forEach((tile) => tile.addEventListener("dblclick", () => enlarge(tile)));

  function move(from, key) {
    const all = tiles();
    const i = all.indexOf(from);
    if (i < 0) return all[0];
    const top = all[0].offsetTop;
    const perRow = Math.max(1, all.filter((t) => t.offsetTop === top).length);
    const step = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -perRow, ArrowDown: perRow }[key];
    return all[Math.min(all.length - 1, Math.max(0, i + step))];
  }

  const help = document.getElementById("help");
  const helpOpen = document.getElementById("help-open");
  if (helpOpen && help) helpOpen.addEventListener("click", () => help.showModal());

  document.addEventListener("keydown", (event) => {
    const target = event.target;
    const typing = target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.tagName === "SELECT");
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (document.querySelector("dialog[open]")) return; // Esc closes it (the browser's own)
    if (["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown"].includes(event.key) && !typing) {
      const all = tiles();
      if (!all.length) return;
      const current = target.classList && target.classList.contains("tile") ? target : null;
      const next = current ? move(current, event.key) : all[0];
      next.focus();
      event.preventDefault();
    } else if (event.key === "Enter" && target.classList && target.classList.contains("tile")) {
      enlarge(target);
      event.preventDefault();
    } else if (typing) {
      return;
    } else if (event.key === "o" && outline) {
      outline.checked = !outline.checked;
      toggle("no-outline", !outline.checked);
    } else if (event.key === "c" && cloud) {
      cloud.checked = !cloud.checked;
      toggle("cloud-view", cloud.checked);
    } else if (event.key === "/") {
      const first = document.querySelector("#query-form input[type=radio]:checked") || document.getElementById("k");
      if (first) first.focus();
      event.preventDefault();
    } else if (event.key === "?" && help) {
      help.showModal();
    }
  });
})();
