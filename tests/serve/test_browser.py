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


NO_CHROMIUM = "needs Chromium (apt-get install chromium); not installed here"


def page_columns(url: str, params: dict, profile) -> dict:
    """Open ``url/?params`` in headless Chromium, let the page run, return {adapter: its column's answer}."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={profile}", "--virtual-time-budget=30000", "--dump-dom",
           f"{url}/?{urllib.parse.urlencode(dict(params, run='1'))}"]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert 'data-done="1"' in dom, dom[-3000:]
    cols = re.findall(r'<div class="col" id="out-([^"]+)">.*?<pre class="result">(.*?)</pre>', dom, re.S)
    assert cols, dom[-3000:]
    return {name: html.unescape(text) for name, text in cols}


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_page_runs_one_sentence_against_several_adapters(cls_server, offline, tmp_path):
    cols = page_columns(cls_server.url, {"text": TEXTS[2], "adapters": "sst_a,sst_b,ner", "key": CLS_KEY},
                        tmp_path / "profile")

    def column(name):
        return cols[name]

    for name in ("sst_a", "sst_b"):
        assert column(name).startswith(offline[name][2]["label"] + "  ("), column(name)
    words = TEXTS[2].split()
    assert column("ner") == " ".join(f"{w}/{t}" for w, t in zip(words, offline["ner"][2]))
