"""Rebuild vendor/vega/: the offline page template of `dvc plots show` and the libraries' licences.

    python scripts/vendor_vega.py                   # npm pack the pinned versions (needs the registry)
    python scripts/vendor_vega.py --tarballs DIR    # or use tarballs `npm pack` already left in DIR

`dvc plots show` writes an HTML page whose charts are drawn by vega, vega-lite and vega-embed; DVC's
own page loads them from a CDN, so it is blank offline. `.dvc/config` points `plots.html_template` at
`vendor/vega/dvc_plots.html` instead: DVC's page with the three minified builds (`build/*.min.js`
of the npm packages) inlined, so the page it writes works anywhere, without a network. This script
writes that template from the npm tarballs and copies the LICENSE files the tarballs carry (vega's
tarball has none; vendor/vega/LICENSE-vega is the vega repository's BSD-3-Clause licence).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "vendor" / "vega"
# The versions DVC's page asks the CDN for are older (vega 5.20.2, vega-lite 5.2.0, vega-embed 6.18.2);
# these are the newest of the same major versions, which DVC's vega-lite v5 specs need.
PACKAGES = {"vega": "5.33.1", "vega-lite": "5.23.0", "vega-embed": "6.29.0"}
# DVC fills three placeholders (dvc_render.html.HTML): {refresh_tag}, {scripts} (the CDN tags, left
# out on purpose) and {plot_divs}, which must be present.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- {versions}: inlined by scripts/vendor_vega.py (BSD-3-Clause, vendor/vega/), no network needed -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def minified(tarball: Path, name: str) -> tuple[str, str]:
    """The package's `build/<name>.min.js` without its source-map comment (nothing to fetch), and the
    SHA-256 of the file as the tarball holds it."""
    with tarfile.open(tarball) as tar:
        data = tar.extractfile(f"package/build/{name}.min.js").read()
    lines = data.decode("utf-8").splitlines()
    script = "\n".join(line for line in lines if not line.startswith("//# sourceMappingURL="))
    for forbidden in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}"):
        if forbidden in script:
            raise SystemExit(f"{tarball.name}: contains {forbidden!r}; it cannot be inlined as is")
    return script, hashlib.sha256(data).hexdigest()


def licence(tarball: Path) -> str | None:
    """The LICENSE file of an npm tarball, if it has one."""
    with tarfile.open(tarball) as tar:
        names = [m for m in tar.getnames() if m.lower() in ("package/license", "package/license.md")]
        return tar.extractfile(names[0]).read().decode("utf-8") if names else None


def npm_pack(folder: Path) -> None:
    """Fetch the pinned tarballs into `folder` with npm."""
    specs = [f"{name}@{version}" for name, version in PACKAGES.items()]
    subprocess.run(["npm", "pack", "--silent", *specs], cwd=folder, check=True, stdout=subprocess.DEVNULL)


def build(tarballs: Path, out: Path = OUT) -> Path:
    """Write the page template and the licences into `out` from the tarballs in `tarballs`."""
    out.mkdir(parents=True, exist_ok=True)
    scripts, versions = [], []
    for name, version in PACKAGES.items():
        tarball = tarballs / f"{name}-{version}.tgz"
        script, digest = minified(tarball, name)
        scripts.append(f"    <!-- {name} {version}: build/{name}.min.js of the npm tarball "
                       f"(sha256 {digest}) -->\n    <script>{script}</script>")
        versions.append(f"{name} {version}")
        text = licence(tarball)
        if text is not None:
            (out / f"LICENSE-{name}").write_text(text)
        elif not (out / f"LICENSE-{name}").exists():
            print(f"{name} {version}: the tarball has no LICENSE; add vendor/vega/LICENSE-{name}",
                  file=sys.stderr)
    page = out / "dvc_plots.html"
    page.write_text(PAGE.format(versions=", ".join(versions), scripts="\n".join(scripts)))
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tarballs", type=Path, help="folder with the npm tarballs (default: npm pack)")
    args = parser.parse_args(argv)
    if args.tarballs:
        page = build(args.tarballs)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            npm_pack(Path(tmp))
            page = build(Path(tmp))
    print(f"wrote {page.relative_to(REPO)} ({page.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
