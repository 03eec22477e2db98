"""`dvc plots show` works offline: .dvc/config's page template inlines the vega libraries, the page it
writes loads nothing from the network, and headless Chromium draws every chart of the project's plot
definitions with the network cut off (skipped where Chromium is not installed). DVC's own page, as a
control, names CDN addresses and draws nothing under the same conditions."""

from __future__ import annotations

import configparser
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "vendor" / "vega" / "dvc_plots.html"


def _load_script():
    path = REPO / "scripts" / "check_plots_offline.py"
    spec = importlib.util.spec_from_file_location("check_plots_offline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load_script()
needs_chromium = pytest.mark.skipif(check.find_chromium() is None, reason="no Chromium on PATH")


@pytest.fixture(scope="module")
def plots_repo(tmp_path_factory) -> Path:
    """A git + DVC repo with the project's `plots:` definitions, .dvc/config and template, and a small
    CSV for every plot (the columns its x and y name)."""
    root = tmp_path_factory.mktemp("plots") / "repo"
    root.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([check.dvc_command(), "init", "-q"], cwd=root, check=True, env=env)
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    (root / "vendor" / "vega").mkdir(parents=True)
    shutil.copy(TEMPLATE, root / "vendor" / "vega" / TEMPLATE.name)
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    for entry in plots:
        (path, props), = entry.items()
        ys = props["y"] if isinstance(props["y"], list) else [props["y"]]
        rows = [",".join([props["x"], *ys])] + [",".join(map(str, [step, *[1.0 / step] * len(ys)]))
                                                 for step in (1, 2, 3)]
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("\n".join(rows) + "\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}))
    return root


def test_the_project_config_names_the_vendored_template():
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc" / "config")
    template = (REPO / ".dvc" / config["plots"]["html_template"]).resolve()  # DVC reads it from .dvc/
    assert template == TEMPLATE.resolve() and template.is_file()
    html = template.read_text(encoding="utf-8")
    assert "{plot_divs}" in html and "{refresh_tag}" in html and "{scripts}" not in html  # no CDN tags
    assert check.network_urls(html) == [] and html.count("<script>") == 3
    for name in ("vega", "vega-lite", "vega-embed"):
        assert (TEMPLATE.parent / f"LICENSE-{name}").is_file(), name


def test_the_page_loads_nothing_from_the_network(plots_repo, tmp_path):
    page = check.plots_page(plots_repo, tmp_path / "out")
    html = page.read_text(encoding="utf-8")
    assert check.network_urls(html) == []
    assert check.chart_count(html) == len(yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"])
    default = check.plots_page(plots_repo, tmp_path / "cdn", html_template=_dvc_default_page(tmp_path))
    assert any("cdn.jsdelivr.net" in url for url in check.network_urls(default.read_text(encoding="utf-8")))


@needs_chromium
def test_chromium_draws_every_chart_with_the_network_off(plots_repo, tmp_path):
    page = check.plots_page(plots_repo, tmp_path / "out")
    problems, summary = check.check_page(page, check.find_chromium())
    assert not problems, problems
    # the control: DVC's own page (vega from a CDN) draws nothing under the same conditions
    default = check.plots_page(plots_repo, tmp_path / "cdn", html_template=_dvc_default_page(tmp_path))
    assert check.drawn_charts(check.offline_dom(default, check.find_chromium(), budget_ms=3000)) == 0


def test_the_script_runs_from_the_command_line(plots_repo, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "check_plots_offline.py"), "--repo",
                           str(plots_repo), "--out", str(tmp_path / "cli")], capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok: ") and "0 network addresses" in done.stdout


def _dvc_default_page(tmp_path: Path) -> Path:
    """DVC's built-in page template (vega from jsDelivr) as a file, to override the repo's config."""
    from dvc_render.html import PAGE_HTML

    path = tmp_path / "dvc_default.html"
    path.write_text(PAGE_HTML)
    return path
