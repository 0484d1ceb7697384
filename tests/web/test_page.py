"""The web page (web/index.html) in headless Chromium, served from a loopback HTTP server: with a tiny
artifact of each embedding kind it writes the Node runner's greedy story (same ids, same text) and its
seeded sampled ids, Stop ends a long story, and a missing artifact is one error line. The headline
artifact's page and its screenshot: `python -m tests.web.screenshot` (after `make repro`). Nothing
is loaded from the network."""
from __future__ import annotations

import functools
import re
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlencode

import pytest

from tests.web.cdp import Chromium, chromium_path
from tests.web.conftest import KINDS, PROMPT, REPO, WEB, node_ids, run_node

N = 60
PAGE = ("index.html", "app.js", "worker.js", "itl.js", "itl.wasm")
HEADLINE = REPO / "checkpoints" / "mixed.safetensors"
TOKENIZER = REPO / "data" / "tokenizer" / "tokenizer.bin"
DONE = "['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state"


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(root):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    with Chromium(exe) as b:
        yield b


@pytest.fixture(scope="module")
def site(node, tiny_artifacts, tok_bin, tmp_path_factory):
    """The page's files and the tiny artifacts in one folder, served on a free loopback port."""
    root = tmp_path_factory.mktemp("site")
    (root / "web").mkdir()
    for name in PAGE:
        shutil.copy(WEB / name, root / "web" / name)
    for kind, path in tiny_artifacts.items():
        shutil.copy(path, root / f"{kind}.safetensors")
    shutil.copy(tok_bin, root / "tokenizer.bin")
    server, url = serve(root)
    yield url
    server.shutdown()


def generate(browser, url: str, **params) -> dict:
    """Open the page with its fields preset, click Generate, wait for the end: the page's result. The
    story goes on past <|endoftext|> unless stop_at_end=1 (as itl-run and the Node runner do)."""
    browser.goto(f"{url}/web/index.html?{urlencode({'stop_at_end': 0, **params})}")
    browser.eval("document.getElementById('generate').click()")
    state = browser.wait(DONE, timeout=40)
    stats = browser.eval("document.getElementById('stats').textContent")
    assert state == "done", stats
    return {**browser.eval("window.itlResult"), "stats": stats,
            "story": browser.eval("document.getElementById('story').textContent")}


@pytest.mark.parametrize("kind", KINDS)
def test_the_page_writes_the_node_runners_greedy_story(browser, site, node, tiny_artifacts, tok_bin, kind):
    got = generate(browser, site, artifact=f"../{kind}.safetensors", tokenizer="../tokenizer.bin", prompt=PROMPT,
                   temperature=0, n=N)
    flags = ("-p", PROMPT, "-n", N, "-t", "0")
    assert got["ids"] == node_ids(node, tiny_artifacts[kind], tok_bin, *flags)
    # the page decodes as TextDecoder does: invalid UTF-8 becomes U+FFFD, as Python's "replace"
    assert got["story"] + "\n" == run_node(node, tiny_artifacts[kind], tok_bin, *flags).stdout.decode(errors="replace")
    assert re.fullmatch(rf"{N} tokens in [\d,.]+ ms, [\d,]+ tok/s \(prompt \d+ tokens, [\d,.]+ ms\)\n"
                        r"loaded: artifact [\d,]+ B, tokenizer [\d,]+ B", got["stats"]), got["stats"]


def test_the_page_samples_the_node_runners_ids_for_a_seed(browser, site, node, tiny_artifacts, tok_bin):
    got = generate(browser, site, artifact="../factorised.safetensors", tokenizer="../tokenizer.bin", prompt=PROMPT,
                   temperature=0.8, top_k=40, top_p=0.9, seed=7, n=N)
    want = node_ids(node, tiny_artifacts["factorised"], tok_bin, "-p", PROMPT, "-n", N, "-t", "0.8", "-k", "40",
                    "--top-p", "0.9", "-s", "7")
    assert got["ids"] == want


def test_picked_files_are_used_instead_of_the_urls(browser, site, node, tiny_artifacts, tok_bin):
    """The file pickers (here set over the DevTools protocol) win over the URL fields, which point nowhere."""
    browser.goto(f"{site}/web/index.html?" + urlencode({"artifact": "../none", "tokenizer": "../none", "temperature": 0,
                                                        "n": N, "stop_at_end": 0}))
    browser.set_files("#artifact-file", [tiny_artifacts["dense"]])
    browser.set_files("#tokenizer-file", [tok_bin])
    browser.eval("document.getElementById('generate').click()")
    assert browser.wait(DONE, timeout=40) == "done", browser.eval("document.getElementById('stats').textContent")
    want = node_ids(node, tiny_artifacts["dense"], tok_bin, "-p", PROMPT, "-n", N, "-t", "0")
    assert browser.eval("window.itlResult.ids") == want


def test_the_story_ends_at_end_of_text_when_asked(browser, site, node, tiny_artifacts, tok_bin, tok_dir):
    """Sampled hot enough to draw <|endoftext|> (its embedding row is zero: logit 0): the page stops
    there, after the Node runner's ids, without the token's text."""
    from iteralite.data.tokenizer import eot_id, load_tokenizer

    eot = eot_id(load_tokenizer(tok_dir / "tokenizer.json"))
    got = generate(browser, site, artifact="../dense.safetensors", tokenizer="../tokenizer.bin", prompt=PROMPT,
                   temperature=5, seed=3, n=5000, stop_at_end=1)
    assert got["ids"][-1] == eot and eot not in got["ids"][:-1] and len(got["ids"]) < 5000
    assert got["stats"].startswith("the end: ") and "<|endoftext|>" not in got["story"]
    flags = ("-p", PROMPT, "-n", len(got["ids"]), "-t", "5", "-s", "3")
    assert got["ids"] == node_ids(node, tiny_artifacts["dense"], tok_bin, *flags)


def test_stop_ends_a_long_story_and_the_page_stays_responsive(browser, site):
    browser.goto(f"{site}/web/index.html?" + urlencode({"artifact": "../dense.safetensors",
                                                        "tokenizer": "../tokenizer.bin", "n": 1000000,
                                                        "stop_at_end": 0}))
    browser.eval("document.getElementById('generate').click()")
    browser.wait("document.getElementById('stats').textContent.includes('tok/s')", timeout=20)
    assert browser.eval("document.body.dataset.state") == "running"
    browser.eval("document.getElementById('stop').click()")
    assert browser.wait(DONE, timeout=10) == "done"
    stats = browser.eval("document.getElementById('stats').textContent")
    assert stats.startswith("stopped: ") and browser.eval("window.itlResult.tokens") < 1000000


def test_a_missing_artifact_is_one_error_line(browser, site):
    browser.goto(f"{site}/web/index.html?" + urlencode({"artifact": "../none.safetensors",
                                                        "tokenizer": "../tokenizer.bin"}))
    browser.eval("document.getElementById('generate').click()")
    assert browser.wait(DONE, timeout=20) == "error"
    stats = browser.eval("document.getElementById('stats').textContent")
    assert re.fullmatch(r"error: cannot fetch the artifact http://127\.0\.0\.1:\d+/none\.safetensors: HTTP 404", stats)
