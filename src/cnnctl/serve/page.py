"""The page at `/`: drop a picture (or choose one) and see the model's top five classes and, for a checkpoint
served through NumPy, the Grad-CAM overlay `cnnctl explain --method gradcam` draws. Its script is served from
`/page.js`, so the page's Content-Security-Policy allows no inline script."""

from __future__ import annotations

import html

CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' blob: data:; "
       "style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def page(name: str, platform: str, classes: list[str], explains: bool) -> str:
    title = html.escape(name)
    note = ("" if explains else "<p class=note>Grad-CAM needs the model's gradients: serve a checkpoint or run "
            "directory (not an .onnx file) to see it.</p>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}: cnnctl serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 16px/1.4 system-ui, sans-serif; margin: 2rem auto; max-width: 46rem; padding: 0 1rem; color: #222; }}
#drop {{ border: 2px dashed #888; border-radius: 8px; padding: 2.5rem 1rem; text-align: center; cursor: pointer; }}
#drop.over {{ background: #eef5ff; border-color: #36c; }}
table {{ border-collapse: collapse; margin: 1rem 0; }} td {{ padding: .2rem .8rem; }}
.bar {{ background: #36c; height: .8rem; }} .note, #error {{ color: #a33; }} img {{ max-width: 100%; }}
</style></head>
<body>
<h1>{title}</h1>
<p>{len(classes)} classes, served by {html.escape(platform)}. Drop a picture below, or click to choose one.</p>
<div id="drop" tabindex="0">Drop a picture here<input id="file" type="file" accept="image/*" hidden></div>
<p id="error" role="alert"></p>
<table id="top" aria-label="top five classes"></table>
<img id="overlay" alt="">
{note}
<p><a href="/docs">API documentation</a> · <a href="/metrics">metrics</a></p>
<script src="/page.js"></script>
</body></html>
"""


SCRIPT = """'use strict';
const drop = document.getElementById('drop'), file = document.getElementById('file');
const top5 = document.getElementById('top'), overlay = document.getElementById('overlay');
const error = document.getElementById('error');

async function answer(response) {
  if (response.ok) return response;
  const body = await response.json();
  throw new Error(body.error + (body.fix ? ' (' + body.fix + ')' : ''));
}

async function show(picture) {
  error.textContent = ''; top5.replaceChildren(); overlay.removeAttribute('src');
  const form = new FormData(); form.append('files', picture, picture.name || 'picture');
  try {
    const result = (await (await answer(await fetch('/predict?top_k=5', {method: 'POST', body: form}))).json())[0];
    for (const t of result.top) {
      const row = top5.insertRow(), bar = document.createElement('div');
      row.insertCell().textContent = t.class;
      row.insertCell().textContent = (100 * t.probability).toFixed(1) + '%';
      bar.className = 'bar'; bar.style.width = (12 * t.probability).toFixed(2) + 'rem';
      row.insertCell().append(bar);
    }
    document.body.dataset.state = 'predicted';
    const explained = await fetch('/explain', {method: 'POST', body: form});
    if (explained.ok) {
      overlay.src = URL.createObjectURL(await explained.blob());
      overlay.alt = 'Grad-CAM of ' + result.prediction;
      await overlay.decode();
    }
    document.body.dataset.state = 'done';
  } catch (e) {
    error.textContent = e.message; document.body.dataset.state = 'failed';
  }
}

drop.addEventListener('click', () => file.click());
drop.addEventListener('keydown', (e) => { if (e.key === 'Enter' || e.key === ' ') file.click(); });
file.addEventListener('change', () => { if (file.files.length) show(file.files[0]); });
drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', (e) => {
  e.preventDefault(); drop.classList.remove('over');
  if (e.dataTransfer.files.length) show(e.dataTransfer.files[0]);
});
"""
