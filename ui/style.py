"""Look of the app: the gradio theme and a little CSS for the parts gradio has no widget for."""

from __future__ import annotations

import gradio as gr


def theme() -> gr.themes.Base:
    # System fonts only: the app runs offline, and a web font would be fetched from the internet.
    sans = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial",
            "sans-serif"]
    mono = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono", "monospace"]
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", neutral_hue="slate",
                          radius_size="md", text_size="md", font=sans, font_mono=mono)


CSS = """
/* ---- model banner ---- */
#model-banner .banner { padding: 8px 12px; border-radius: 10px; border: 1px solid var(--border-color-primary);
  background: var(--background-fill-secondary); }
#model-banner .banner-head { display: flex; flex-wrap: wrap; align-items: center; gap: 6px 10px; }
#model-banner .model-name { font-weight: 600; }
#model-banner .chip { font-size: 0.85em; padding: 1px 8px; border-radius: 999px;
  background: var(--background-fill-primary); border: 1px solid var(--border-color-primary); }
#model-banner .chip b { font-weight: 600; opacity: 0.7; margin-right: 2px; }
#model-banner .muted, #context-meter .muted { opacity: 0.65; }
#model-banner .banner-hint { margin-top: 2px; font-size: 0.85em; opacity: 0.8; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; }
#model-banner .banner-head { flex-wrap: nowrap; overflow: hidden; white-space: nowrap; }
#model-banner .banner { padding: 4px 10px; }
#context-meter .meter-text { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
/* Laptop screens: the chat fills the window height (see chat_tab), so trim gradio's outer margins. */
.gradio-container .main { padding-top: 6px; }
#tabs > .tab-wrapper { margin-bottom: 4px; }
#model-banner .load-error { color: var(--error-text-color, #b91c1c); }
#model-banner .status-dot { width: 10px; height: 10px; border-radius: 50%; background: #9ca3af; display: inline-block;
  flex-shrink: 0; }
#model-banner .status-dot.ready { background: #16a34a; }
#model-banner .status-dot.loading { background: #f59e0b; animation: dsvl-pulse 1s infinite alternate; }
#model-banner .status-dot.failed { background: #dc2626; }
#model-banner .load-bar { width: 160px; height: 8px; border-radius: 4px; background: var(--border-color-primary);
  overflow: hidden; display: inline-block; }
#model-banner .load-bar span { display: block; height: 100%; background: var(--color-accent); }
@keyframes dsvl-pulse { from { opacity: 0.35; } to { opacity: 1; } }

/* ---- transcript: attachments are thumbnails, click to open them full size ---- */
#chatbot .message img, #chatbot .message-content img, #chatbot .file-container img {
  max-height: 140px; max-width: 220px; width: auto; border-radius: 6px;
  /* A 30000×10 strip would shrink to under a pixel: keep a visible box and show its middle (for other
     images the box has their own shape, so nothing is cut). */
  min-height: 24px; min-width: 24px; object-fit: cover; }
#gen-stats { font-size: 0.8em; opacity: 0.7; min-height: 1.2em; }
/* ‹ 2/3 › under a message with other versions (views.variant_nav) */
#chatbot .variants { font-size: 0.85em; opacity: 0.75; white-space: nowrap; user-select: none; }
#chatbot .variants button { padding: 0 6px; border-radius: 4px; cursor: pointer; font-weight: 600; }
#chatbot .variants button:hover { background: var(--background-fill-secondary); opacity: 1; }
#chatbot .variants .variant-end { padding: 0 6px; opacity: 0.35; }
#variant-events { display: none; }

/* ---- notices ---- */
.notice { padding: 8px 12px; border-radius: 8px; border: 1px solid; }
.notice-error, .notice-warning { color: #991b1b; background: #fef2f2; border-color: #fecaca; }
.notice-info { color: #1e3a8a; background: #eff6ff; border-color: #bfdbfe; }
.dark .notice-error, .dark .notice-warning { color: #fecaca; background: #450a0a; border-color: #7f1d1d; }
.dark .notice-info { color: #bfdbfe; background: #172554; border-color: #1e3a8a; }
#edit-bar { align-items: center; }
#edit-bar.off { display: none; }

/* ---- context meter ---- */
#context-meter .meter { font-size: 0.85em; }
#context-meter .meter-bar { display: flex; height: 6px; border-radius: 3px; overflow: hidden;
  background: var(--border-color-primary); margin-bottom: 3px; }
#context-meter .meter-used { background: var(--color-accent); }
#context-meter .meter-reserved { background: var(--color-accent); opacity: 0.35; }
#context-meter .meter-warn .meter-used { background: #f59e0b; }
#context-meter .meter-over .meter-used { background: #dc2626; }
#context-meter .meter-warning { color: #b45309; margin-top: 2px; }
#context-meter .meter-over .meter-warning { color: #b91c1c; }

/* ---- history sidebar ---- */
#history-list label { width: 100%; }
#history-list .wrap { flex-direction: column; gap: 4px; }
#history-list label span { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
#search-results .search-count { font-size: 0.8em; opacity: 0.7; margin: 2px 0 4px; }
#search-results .search-empty { font-size: 0.85em; opacity: 0.75; }
#search-results ul.search-hits { list-style: none; margin: 0; padding: 0; }
#search-results li.search-hit { padding: 6px 8px; margin: 0 0 4px; border-radius: 6px; cursor: pointer;
  border: 1px solid var(--border-color-primary); background: var(--background-fill-primary); }
#search-results li.search-hit:hover, #search-results li.search-hit:focus { border-color: var(--color-accent); }
#search-results .search-hit-title { font-weight: 600; font-size: 0.85em; }
#search-results .search-hit-snippet { font-size: 0.8em; opacity: 0.85; }
#search-results .search-hit-role { opacity: 0.6; }
#search-results mark { background: #fde68a; color: inherit; padding: 0 1px; border-radius: 2px; }
#delete-confirm { border: 1px solid #fecaca; border-radius: 8px; padding: 6px; }
#pdf-pages .caption-label { font-size: 0.75em; }
"""

# Search results are plain HTML; one delegated listener turns a click (or Enter) on a hit into a
# `click` event carrying the conversation id.
SEARCH_JS = """
const pick = (event) => {
  const hit = event.target.closest('[data-conversation]');
  if (hit) trigger('click', {conversation: hit.dataset.conversation});
};
element.addEventListener('click', pick);
element.addEventListener('keydown', (event) => { if (event.key === 'Enter') pick(event); });
"""

# The message being typed, kept in the tab's sessionStorage: when the server goes away gradio reloads the page
# as soon as it is back, which would lose it. Restored into an empty box on load; a sent message (the box
# cleared by the server) clears the copy too, so it is sampled rather than saved on input events.
KEEP_DRAFT_JS = """
() => {
  const key = 'dsvl-draft';
  const draft = sessionStorage.getItem(key) || '';
  const start = () => {
    const box = document.querySelector('#chat-input textarea');
    if (!box) return setTimeout(start, 100);
    if (draft && !box.value) {
      box.value = draft;
      box.dispatchEvent(new Event('input', {bubbles: true}));
    }
    setInterval(() => sessionStorage.setItem(key, box.value), 300);
  };
  start();
}
"""

# A page opened on a conversation by address (/?c=<id>, where the screenshot hotkey sends the browser) puts the
# cursor in the message box, ready for the question about the screenshot.
FOCUS_OPENED_JS = """
() => {
  if (!new URLSearchParams(window.location.search).has('c')) return;
  const focus = () => {
    const box = document.querySelector('#chat-input textarea');
    if (!box) return setTimeout(focus, 100);
    box.focus();
  };
  focus();
}
"""

# The ‹ › arrows live inside chatbot messages, which have no per-message events of their own: one listener
# (capturing, so the chatbot does not also treat the click as selecting the message) turns a click on an
# arrow into a `click` event of the hidden #variant-events element, carrying the id of the version to show.
VARIANT_JS = r"""
document.addEventListener('click', (event) => {
  const arrow = event.target.closest('#chatbot .variant-nav');
  if (!arrow) return;
  event.stopPropagation();
  event.preventDefault();
  const match = [...arrow.classList].map((name) => /^variant-(\d+)$/.exec(name)).find(Boolean);
  if (match) trigger('click', {message: Number(match[1])});
}, true);
"""
