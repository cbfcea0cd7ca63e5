"""A screenshot of `xllm serve`'s page after a short conversation about an image (the README's picture).

    python tools/serve_screenshot.py --adapter runs/demo/stage2/adapter \
        --image .cache/demo/data/images/test_00000.png --ask "Is there a blue circle?" --ask "What else?" \
        --out docs/serve_page.png

Starts `xllm serve` on a free 127.0.0.1 port, drives the page in headless Chromium (Debian's, through
Playwright) as a user would — attach the image, ask, wait for each streamed answer — and saves the page.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"xllm serve exited with code {server.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"xllm serve did not answer {url} within {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--image", required=True, help="attached to the first question")
    parser.add_argument("--ask", action="append", required=True, help="a question (repeat for more turns)")
    parser.add_argument("--out", default="docs/serve_page.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "xllm.apps.cli", "serve", "--adapter", args.adapter,
                               "--port", str(port)])
    try:
        wait_until_up(f"http://127.0.0.1:{port}/v1/models", server)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 900, "height": 640})
            page.goto(f"http://127.0.0.1:{port}/")
            for turn, question in enumerate(args.ask):
                if turn == 0:
                    page.set_input_files("#file", args.image)
                page.fill("#text", question)
                page.click("#send")
                page.wait_for_selector(f"#answer-{2 * turn + 1}[data-done=true]", timeout=300_000)
                print(page.text_content(f"#answer-{2 * turn + 1}"))
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
