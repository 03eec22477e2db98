"""Check that `dvc plots show` draws its charts without a network.

    python scripts/check_plots_offline.py                 # the project's plots (after `make demo`)
    python scripts/check_plots_offline.py --repo DIR --out DIR --html-template FILE

1. `dvc plots show -o OUT` in the repo: the page template is `.dvc/config`'s `plots.html_template`
   (vendor/vega/dvc_plots.html, the vega libraries inlined) unless `--html-template` names another.
2. The page names no network address: no `src`/`href` of a script, stylesheet, image or frame is an
   http(s):// or protocol-relative URL.
3. Where Chromium is installed, headless Chromium opens the page with the network cut off (a new network
   namespace through `unshare -rn` where the system allows one, every host name unresolvable and a dead
   proxy in any case) and every chart of the page (one `vegaEmbed` call each) is drawn (its
   `class="marks"` canvas is in the DOM). Without Chromium this step is reported as skipped.

Exit status 0 when every check that ran passed, 1 otherwise (the problems are printed).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
# A tag attribute that would make the browser fetch from a network address.
NETWORK_SOURCE = re.compile(r"<(?:script|link|img|iframe)\b[^>]*?\b(?:src|href)\s*=\s*[\"']?"
                            r"((?:https?:)?//[^\"'\s>]+)", re.IGNORECASE)
CHART_CALL = re.compile(r"vegaEmbed\(\s*['\"]#")
DRAWN_CHART = re.compile(r"<(?:canvas|svg)\b[^>]*\bclass=\"marks\"")


def dvc_command() -> str:
    """The dvc of this interpreter's environment (the project's venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else "dvc"


def plots_page(repo: Path, out: Path, html_template: Path | None = None) -> Path:
    """Run `dvc plots show` in `repo`, writing into `out`; the page's path."""
    command = [dvc_command(), "plots", "show", "-o", str(out)]
    if html_template is not None:
        command += ["--html-template", str(html_template)]
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True)
    page = out / "index.html"
    if done.returncode != 0 or not page.exists():
        raise RuntimeError(f"{' '.join(command)} wrote no page (are the plots' files there?):\n"
                           f"{done.stdout}{done.stderr}")
    return page


def network_urls(html: str) -> list[str]:
    """The network addresses the page's tags would load (none for an offline page)."""
    return NETWORK_SOURCE.findall(html)


def chart_count(html: str) -> int:
    """How many charts the page embeds (DVC writes one `vegaEmbed('#id', spec)` per plot)."""
    return len(CHART_CALL.findall(html))


def find_chromium() -> str | None:
    """A Chromium-family browser on PATH, if any."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _no_network_prefix() -> list[str]:
    """`unshare -rn` (a user and network namespace with no interface up) where this system allows it."""
    if not shutil.which("unshare"):
        return []
    allowed = subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0
    return ["unshare", "-rn"] if allowed else []


def offline_dom(page: Path, browser: str, budget_ms: int = 15000) -> str:
    """The DOM of `page` after headless `browser` ran its scripts (up to `budget_ms` of virtual time)
    with no network."""
    with tempfile.TemporaryDirectory() as profile:
        command = [*_no_network_prefix(), browser, "--headless", "--no-sandbox", "--disable-gpu",
                   f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND",
                   "--proxy-server=socks5://127.0.0.1:9", "--no-first-run", "--disable-extensions",
                   f"--virtual-time-budget={budget_ms}", "--dump-dom", page.resolve().as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{browser} failed on {page}:\n{done.stderr[-2000:]}")
    return done.stdout


def drawn_charts(dom: str) -> int:
    """How many charts vega drew into the DOM."""
    return len(DRAWN_CHART.findall(dom))


def check_page(page: Path, browser: str | None) -> tuple[list[str], str]:
    """The problems of a written page and a line saying what was checked."""
    html = page.read_text(encoding="utf-8")
    expected, urls = chart_count(html), network_urls(html)
    problems = [f"{page} loads {url}" for url in urls]
    if expected == 0:
        problems.append(f"{page} embeds no chart")
    summary = f"{expected} charts, {len(urls)} network addresses"
    if browser is None:
        return problems, f"{summary}; drawing skipped (no Chromium on PATH)"
    drawn = drawn_charts(offline_dom(page, browser))
    if drawn != expected:
        problems.append(f"{page}: {drawn} of {expected} charts drawn with the network off")
    return problems, f"{summary}; {drawn} drawn offline by {Path(browser).name}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="the DVC project (default: this one)")
    parser.add_argument("--out", type=Path, help="where dvc writes the page (default: a temporary folder)")
    parser.add_argument("--html-template", type=Path, help="instead of .dvc/config's plots.html_template")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        page = plots_page(args.repo, (args.out or Path(tmp)).resolve(), args.html_template)
        problems, summary = check_page(page, find_chromium())
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    print(("FAILED: " if problems else "ok: ") + summary)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
