"""A screenshot of the demo page after one request, in headless chromium (the README's picture).

    python scripts/demo_screenshot.py --run runs/world --prompt "two red circles" --out docs/img/demo.png
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import anyloom
    from anyloom.demo.app import build_app, launch
    from anyloom.demo.browser import DemoPage, ensure_chromium, open_browser
    from anyloom.demo.session import DemoSession

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/world")
    p.add_argument("--prompt", default="two red circles")
    p.add_argument("--make", default="picture", choices=["picture", "speech", "text"])
    p.add_argument("--out", default="docs/img/demo.png")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    session = DemoSession(anyloom.load(a.run, device="cpu"), a.run)
    app = build_app(session)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(app, port=port, block=False)
    print(f"serving {a.run} after {time.perf_counter() - t0:.1f} s")
    driver = open_browser(ensure_chromium(), width=1280, height=1100)
    try:
        page = DemoPage(driver, f"http://127.0.0.1:{port}/")
        page.type_prompt(a.prompt)
        page.choose(a.make)
        print(page.generate())
        time.sleep(1.0)  # the gallery's pictures finish loading
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(a.out)
    finally:
        driver.quit()
        app.close()
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
