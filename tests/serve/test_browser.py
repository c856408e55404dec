"""The page at ``/`` in a real headless Chromium (Debian's package) against the real server: one sentence
against three adapters side by side, each column showing what the adapter answers offline."""
import html
import re
import shutil
import subprocess
import urllib.parse

import pytest

from .conftest import CLS_KEY, TEXTS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium); not installed here")
def test_page_runs_one_sentence_against_several_adapters(cls_server, offline, tmp_path):
    q = urllib.parse.urlencode({"text": TEXTS[2], "adapters": "sst_a,sst_b,ner", "key": CLS_KEY, "run": "1"})
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000", "--dump-dom",
           f"{cls_server.url}/?{q}"]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert 'data-done="1"' in dom, dom[-3000:]

    def column(name):
        m = re.search(rf'<div class="col" id="out-{name}">.*?<pre class="result">(.*?)</pre>', dom, re.S)
        assert m, dom[-3000:]
        return html.unescape(m.group(1))

    for name in ("sst_a", "sst_b"):
        assert column(name).startswith(offline[name][2]["label"] + "  ("), column(name)
    words = TEXTS[2].split()
    assert column("ner") == " ".join(f"{w}/{t}" for w, t in zip(words, offline["ner"][2]))
