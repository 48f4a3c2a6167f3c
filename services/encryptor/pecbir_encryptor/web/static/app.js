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

  // Drawing the tumour outline on an uploaded PNG slice (when there is no mask or SEG): the
  // polygon is filled at the image's own size and sent as the mask, an NPY array (uint8 0/1),
  // so that no colour conversion of the browser's PNG encoder can change it.
  const drawOpen = document.getElementById("draw-open");
  const draw = document.getElementById("draw");
  const imageInput = document.getElementById("image");
  const maskInput = document.getElementById("mask");
  let slice = null;
  let points = [];
  function npyBytes(mask, width, height) {
    let header = "{'descr': '|u1', 'fortran_order': False, 'shape': (" + height + ", " + width + "), }";
    const total = 10 + header.length + 1;
    header += " ".repeat((64 - (total % 64)) % 64) + "\n";
    const out = new Uint8Array(10 + header.length + mask.length);
    out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0, header.length & 255, header.length >> 8]);
    for (let i = 0; i < header.length; i++) out[10 + i] = header.charCodeAt(i);
    out.set(mask, 10 + header.length);
    return out;
  }
  function redraw() {
    const canvas = document.getElementById("draw-canvas");
    const ctx = canvas.getContext("2d");
    ctx.drawImage(slice, 0, 0, canvas.width, canvas.height);
    ctx.strokeStyle = "#ff4646";
    ctx.fillStyle = "#ff4646";
    ctx.lineWidth = 2;
    ctx.beginPath();
    points.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    if (points.length > 2) ctx.closePath();
    ctx.stroke();
    points.forEach(([x, y]) => ctx.fillRect(x - 2, y - 2, 4, 4));
    document.getElementById("draw-status").textContent = points.length + " points";
  }
  function useOutline() {
    if (points.length < 3) {
      document.getElementById("draw-status").textContent = "at least 3 points";
      return;
    }
    const canvas = document.getElementById("draw-canvas");
    const width = slice.naturalWidth, height = slice.naturalHeight;
    const off = document.createElement("canvas");
    off.width = width;
    off.height = height;
    const ctx = off.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.beginPath();
    points.forEach(([x, y], i) => {
      const px = (x * width) / canvas.width, py = (y * height) / canvas.height;
      i ? ctx.lineTo(px, py) : ctx.moveTo(px, py);
    });
    ctx.closePath();
    ctx.fill();
    const rgba = ctx.getImageData(0, 0, width, height).data;
    const mask = new Uint8Array(width * height);
    for (let i = 0; i < mask.length; i++) mask[i] = rgba[4 * i + 3] >= 128 ? 1 : 0;
    const file = new File([npyBytes(mask, width, height)], "drawn-mask.npy", { type: "application/octet-stream" });
    const transfer = new DataTransfer();
    transfer.items.add(file);
    maskInput.files = transfer.files;
    document.getElementById("from-upload").checked = true;
    draw.close();
    drawOpen.textContent = "outline drawn (" + points.length + " points) · draw again";
  }
  if (imageInput && drawOpen && draw) {
    imageInput.addEventListener("change", () => {
      const file = imageInput.files[0];
      drawOpen.hidden = !(file && /\.png$/i.test(file.name));
    });
    drawOpen.addEventListener("click", () => {
      slice = new Image();
      slice.onload = () => {
        points = [];
        redraw();
        draw.showModal();
      };
      slice.src = URL.createObjectURL(imageInput.files[0]);
    });
    const canvas = document.getElementById("draw-canvas");
    canvas.addEventListener("click", (event) => {
      const box = canvas.getBoundingClientRect();
      points.push([
        ((event.clientX - box.left) * canvas.width) / box.width,
        ((event.clientY - box.top) * canvas.height) / box.height,
      ]);
      redraw();
    });
    draw.addEventListener("keydown", (event) => {
      if (event.key === "Enter") { useOutline(); event.preventDefault(); }
      if (event.key === "Backspace") { points.pop(); redraw(); event.preventDefault(); }
    });
    document.getElementById("draw-use").addEventListener("click", useOutline);
    document.getElementById("draw-clear").addEventListener("click", () => { points = []; redraw(); });
    document.getElementById("draw-cancel").addEventListener("click", () => draw.close());
  }

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
  document.addEventListener("dblclick", (event) => {
    const tile = event.target.closest && event.target.closest(".tile");
    if (tile) enlarge(tile);
  });

  // The result's tiles come pending: each is asked for in rank order, a few at a time (the
  // server opens it: fetch, key release, decryption) and replaces its placeholder when open,
  // so the first case shows as soon as it is open rather than when all are.
  const OPENING_AT_ONCE = 4;
  function settle(tile, html) {
    const holder = document.createElement("template");
    holder.innerHTML = html.trim();
    const opened = holder.content.firstElementChild;
    if (!opened || !opened.classList.contains("tile")) throw new Error("not a tile");
    const focused = document.activeElement === tile;
    tile.replaceWith(opened);
    if (focused) opened.focus();
    if (body.classList.contains("cloud-view")) toggle("cloud-view", true);
  }
  function failed(tile, why) {
    tile.dataset.state = "failed";
    tile.className = "tile state-failed";
    const frame = tile.querySelector(".frame");
    frame.className = "frame locked failed";
    frame.textContent = "";
    const title = document.createElement("p");
    title.innerHTML = "<strong>Could not be opened</strong>";
    const reason = document.createElement("p");
    reason.className = "reason";
    reason.textContent = why;
    frame.append(title, reason);
  }
  async function openTiles() {
    const queue = Array.from(document.querySelectorAll(".tile[data-tile]"));
    async function worker(tiles) {
      for (let tile = tiles.shift(); tile; tile = tiles.shift()) {
        try {
          const answer = await fetch(tile.dataset.tile, { headers: { accept: "text/html" } });
          if (answer.redirected && new URL(answer.url).pathname === "/ui/login") {
            failed(tile, "the session has ended: sign in again to see this case");
          } else if (!answer.ok) {
            const detail = await answer.text();
            failed(tile, answer.status + ": " + (detail.match(/"detail":\s*"([^"]*)"/) || [, detail.slice(0, 120)])[1]);
          } else {
            settle(tile, await answer.text());
          }
        } catch (error) {
          failed(tile, "the page could not reach the encryptor (" + error.message + ")");
        }
      }
    }
    // the first case alone (it has the machine to itself), then the rest a few at a time
    if (queue.length) await worker(queue.splice(0, 1));
    await Promise.all(Array.from({ length: OPENING_AT_ONCE }, () => worker(queue)));
    document.getElementById("hits").dataset.settled = "true";
  }
  if (document.getElementById("hits")) openTiles();

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
    } else if (event.key === "v" && target.classList && target.classList.contains("tile")) {
      const link = target.querySelector("a.viewer");
      if (link) window.open(link.href, "_blank", "noopener,noreferrer");
    } else if (event.key === "?" && help) {
      help.showModal();
    }
  });
})();
