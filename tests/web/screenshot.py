"""By hand, after `make repro`: the page on the pipeline's headline artifact, served from the repo root
(the page's defaults), must write the Node runner's greedy story; then a sampled story to its end is
saved as docs/web_page.png. Not a test: a fresh clone has no artifact to run.

    python -m tests.web.screenshot
"""
from __future__ import annotations

import shutil
import sys

from tests.web.cdp import Chromium, chromium_path
from tests.web.conftest import PROMPT, REPO, run_node
from tests.web.test_page import HEADLINE, TOKENIZER, generate, serve

OUT = REPO / "docs" / "web_page.png"


def main() -> int:
    exe, node = chromium_path(), shutil.which("node")
    missing = [what for what, ok in (("chromium", exe), ("node", node), (str(HEADLINE), HEADLINE.is_file()),
                                     ("web/itl.wasm (make wasm)", (REPO / "web" / "itl.wasm").is_file())) if not ok]
    if missing:
        print(f"screenshot: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    server, url = serve(REPO)
    try:
        with Chromium(exe) as browser:
            got = generate(browser, url, prompt=PROMPT, temperature=0, n=200)
            proc = run_node(node, HEADLINE, TOKENIZER, "-p", PROMPT, "-n", 200, "-t", "0")
            if got["story"] + "\n" != proc.stdout.decode():
                print("screenshot: the page's greedy story differs from the Node runner's", file=sys.stderr)
                return 1
            got = generate(browser, url, n=300, stop_at_end=1)
            print(f"headline page: {got['stats']}\n{got['story']}")
            browser.screenshot(str(OUT))
    finally:
        server.shutdown()
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
