"""The report in a real headless browser (Debian's `chromium`): every image loads, nothing overflows a
1200-pixel page, no None / nan / raw dict reaches the text. Used by tests/test_bench_sql.py."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

WIDTH = 1200
# Runs in the page after load; its verdict goes into the DOM that --dump-dom prints.
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0,
                                              right: i.getBoundingClientRect().right}));
  const wide = [...document.body.querySelectorAll('*')].filter(e => e.getBoundingClientRect().right > %d + 0.5)
                 .map(e => e.tagName + ':' + (e.textContent || '').slice(0, 40));
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify({imgs, wide, scrollWidth: document.documentElement.scrollWidth,
                                    text: document.body.innerText});
  document.body.appendChild(pre);
});
</script>""" % WIDTH


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def probe(index: Path) -> dict:
    """Load a copy of index.html (beside it, so its images resolve) in headless chromium at 1200 px."""
    copy = index.with_name("probe.html")
    copy.write_text(index.read_text().replace("</body>", PROBE + "</body>"))
    proc = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                           f"--window-size={WIDTH},900", "--virtual-time-budget=10000", "--dump-dom",
                           copy.as_uri()], capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"chromium printed no probe result: {proc.returncode} {proc.stderr[-1500:]}"
    import html

    return json.loads(html.unescape(found.group(1)))
