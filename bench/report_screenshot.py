"""A PNG of `batch report OUT` as a browser shows it, for the README: headless Chromium, then shrunk.

    .venv/bin/python bench/report_screenshot.py OUT [--png docs/report.png] [--height 2300]
    .venv/bin/python bench/report.py --attempts 200000 --keep /tmp/report-demo/out   # an OUT with faults

Renders OUT's report into a temporary file (OUT is only read), screenshots the
top ``--height`` CSS pixels at 1280 wide with Debian's ``chromium``
(offline: no network, no profile kept), then scales it to ``--width`` and
quantizes it to 256 colours with Pillow (which comes with matplotlib), so
the PNG stays a few hundred kB.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def screenshot(html: Path, png: Path, height: int, profile: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no chromium on PATH (Debian: apt-get install chromium)")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                    "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
                    f"--window-size=1280,{height}", f"--screenshot={png}", html.as_uri()],
                   check=True, capture_output=True, timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path, help="an output directory (output.path of a job)")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "report.png")
    ap.add_argument("--height", type=int, default=2300, help="CSS pixels of the page to keep, from the top")
    ap.add_argument("--width", type=int, default=960, help="width of the PNG in pixels")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="batch-shot-") as tmp:
        html, raw = Path(tmp) / "report.html", Path(tmp) / "raw.png"
        subprocess.run([sys.executable, "-m", "batch", "report", str(args.output), "--html", str(html)],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        screenshot(html, raw, args.height, Path(tmp) / "profile")
        with Image.open(raw) as image:
            small = image.convert("RGB").resize((args.width, round(image.height * args.width / image.width)),
                                                Image.Resampling.LANCZOS)
        args.png.parent.mkdir(parents=True, exist_ok=True)
        small.quantize(colors=256).save(args.png, optimize=True)
    print(f"{args.png}: {args.png.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
