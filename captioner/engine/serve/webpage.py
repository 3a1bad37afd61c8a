"""The page `captioner serve` shows at /: drop or pick images, each caption appears with its attention panels.

One self-contained HTML file (no external script, style or font: it works offline). The server renders
each entry with the gallery's own HTML (engine/outputs/gallery.py entry_html, asked for with ?html=1), so the page
and `captioner caption --html` draw attention the same way; the script here only uploads and inserts.
"""
from __future__ import annotations

import html

from captioner.engine.outputs.gallery import STYLE

PAGE_STYLE = """
.drop { display: block; border: 2px dashed #999; border-radius: 8px; padding: 28px 12px; text-align: center;
        background: #fff; margin: 0 0 16px; cursor: pointer; font-size: 16px; }
.drop input { display: block; margin: 10px auto 0; max-width: 100%; }
body.dragging .drop { border-color: #2a7a3a; background: #eef8ee; }
.entry.pending { display: block; color: #555; }
.token { margin: 0 0 12px; } .token input { width: 18em; max-width: 100%; }
@media (max-width: 600px) { body { margin: 10px; } .entry { flex-direction: column; } h1 { font-size: 22px; } }
"""

SCRIPT = """
const results = document.getElementById('results'), pick = document.getElementById('pick');
const tokenField = document.getElementById('token');
function authHeaders() {
  const t = tokenField ? tokenField.value.trim() : '';
  return t ? {'Authorization': 'Bearer ' + t} : {};
}
function fail(slot, name, message) {
  slot.className = 'entry error';
  slot.textContent = name + ': ' + message;
}
async function send(file) {
  const slot = document.createElement('div');
  slot.className = 'entry pending';
  slot.textContent = 'captioning ' + file.name + ' ...';
  results.prepend(slot);
  const form = new FormData();
  form.append('image', file, file.name);
  try {
    const response = await fetch('v1/caption?html=1', {method: 'POST', body: form, headers: authHeaders()});
    let data;
    try { data = await response.json(); } catch (e) { data = {error: 'HTTP ' + response.status}; }
    const item = (data.results || [])[0];
    if (item && item.html) {
      slot.insertAdjacentHTML('afterend', item.html);
      slot.remove();
    } else {
      fail(slot, file.name, data.error || ('HTTP ' + response.status));
    }
  } catch (e) {
    fail(slot, file.name, 'could not reach the server (' + e + ')');
  }
}
function handle(files) { for (const file of Array.from(files)) send(file); }
pick.addEventListener('change', () => { handle(pick.files); pick.value = ''; });
document.addEventListener('dragover', e => { e.preventDefault(); document.body.classList.add('dragging'); });
document.addEventListener('dragleave', e => { if (!e.relatedTarget) document.body.classList.remove('dragging'); });
document.addEventListener('drop', e => {
  e.preventDefault();
  document.body.classList.remove('dragging');
  if (e.dataTransfer && e.dataTransfer.files.length) handle(e.dataTransfer.files);
});
"""


def page(model_info: dict, needs_token: bool = False) -> str:
    """The whole page; model_info as /v1/model describes it (its title line)."""
    title = f"captioner: {model_info.get('checkpoint', 'a checkpoint')}"
    about = model_info.get("description", "")
    token = ('<p class="token"><label>API token: <input id="token" type="password" autocomplete="off" '
             'placeholder="the server\'s --token"></label></p>') if needs_token else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{" ".join(STYLE.split())} {" ".join(PAGE_STYLE.split())}</style></head><body>
<header><h1>{html.escape(title)}</h1><p>{html.escape(about)} Each word of a caption comes with where the decoder
looked when it chose that word: its attention over the grid of image regions, the most attended regions bright
and the others shaded. Images are sent to this server only.</p></header>
{token}<label class="drop">Drop images here, or pick them:
<input id="pick" type="file" accept="image/*" multiple></label>
<main id="results"></main>
<script>{SCRIPT}</script>
</body></html>
"""
