"""Architecture contracts: the import layers, no import cycles, dvc.yaml deps that cover the code each stage
runs, one stage registry agreeing with dvc.yaml / params.yaml / stages/, and strict xfails. Each checker is
also run on a small fake repo with a deliberate violation, to show that it catches one."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from tests import contracts

REPO = contracts.REPO

# --- the real repo ---------------------------------------------------------------------------------------


def test_layers_are_respected():
    lines = contracts.layer_violations(contracts.import_graph(REPO))
    assert not lines, "forbidden imports:\n" + "\n".join(lines)


def test_no_import_cycles():
    cycles = contracts.find_cycles(contracts.import_graph(REPO))
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(cycle) for cycle in cycles)


def test_dvc_deps_cover_the_code_of_each_stage():
    problems = contracts.missing_deps(REPO)
    assert not problems, ("dvc.yaml deps miss code their stage runs (`python -m tests.contracts` "
                          "rewrites them):\n" + yaml.safe_dump(problems, sort_keys=False))


def test_registry_matches_dvc_params_and_stage_modules():
    lines = contracts.registry_mismatches(REPO)
    assert not lines, "\n".join(lines)


def test_xfails_are_strict():
    lines = contracts.non_strict_xfails(REPO)
    assert not lines, "xfail without strict=True (an unexpected pass goes unnoticed):\n" + "\n".join(lines)


# --- a fake repo, clean until a test breaks it -----------------------------------------------------------

FAKE = {
    "models/__init__.py": "",
    "models/net.py": "import torch\n",
    "pipeline/__init__.py": "",
    "pipeline/core/__init__.py": "",
    "pipeline/core/params.py": "import yaml\n",
    "pipeline/core/stage_cli.py": "from pipeline.core.params import load\n",
    "pipeline/motion/__init__.py": "",
    "pipeline/motion/helpers.py": "",
    "pipeline/motion/cycle.py": "from models.net import Net\nfrom . import helpers\n",
    "pipeline/classify/__init__.py": "",
    "pipeline/classify/mix.py": "from pipeline.core.params import load\n",
    "pipeline/orchestrate/__init__.py": "",
    "pipeline/orchestrate/flows.py": "import stages.a\n",
    "stages/__init__.py": "",
    "stages/a.py": "from pipeline.core import stage_cli\nfrom pipeline.motion.cycle import cycle\n",
    "stages/b.py": """\
        import numpy
        from models import net


        def run():
            from pipeline.classify.mix import mix
        """,
    "dvc.yaml": """\
        stages:
          a:
            cmd: python -m stages.a --fast
            deps: [stages/a.py, pipeline/core/, pipeline/motion/cycle.py, pipeline/motion/helpers.py,
                   models/net.py, data/raw]
          b:
            foreach: {small: {n: 1}, big: {n: 2}}
            do:
              cmd: python -m stages.b --n ${item.n}
              deps: [stages/b.py, models/net.py, pipeline/classify/mix.py, pipeline/core/params.py,
                     "data/${key}"]
        """,
    "params.yaml": "paths: {raw: data/raw}\na: {seed: 0}\nb: {n: 1}\n",
    "tests/test_x.py": """\
        import pytest


        @pytest.mark.xfail(strict=True, reason="known")
        def test_x():
            assert False
        """,
}
FAKE_STAGES = ("a", "b")


def write(root: Path, relpath: str, text: str) -> None:
    (root / relpath).parent.mkdir(parents=True, exist_ok=True)
    (root / relpath).write_text(textwrap.dedent(text))


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    for relpath, text in FAKE.items():
        write(tmp_path, relpath, text)
    return tmp_path


def test_fake_repo_is_clean(fake):
    graph = contracts.import_graph(fake)
    assert contracts.layer_violations(graph) == [] and contracts.find_cycles(graph) == []
    assert contracts.missing_deps(fake) == {}
    assert contracts.registry_mismatches(fake, FAKE_STAGES) == []
    assert contracts.non_strict_xfails(fake) == []


def test_import_graph_resolves_submodules_relative_and_function_imports(fake):
    graph = contracts.import_graph(fake)
    assert graph["stages.a"] == {"pipeline.core.stage_cli", "pipeline.motion.cycle"}
    assert graph["pipeline.motion.cycle"] == {"models.net", "pipeline.motion.helpers"}
    assert graph["stages.b"] == {"models.net", "pipeline.classify.mix"}  # numpy is not in the repo
    assert graph["pipeline.core.stage_cli"] == {"pipeline.core.params"}  # `load` is no module
    assert contracts.module_closure(graph, "stages.b") == {"stages.b", "models.net", "pipeline.classify.mix",
                                                           "pipeline.core.params"}


@pytest.mark.parametrize("module, layer", [("models.net", 0), ("pipeline", 1), ("pipeline.core.params", 1),
                                           ("pipeline.data.video", 2), ("pipeline.motion.cycle", 3),
                                           ("pipeline.classify", 3), ("stages", 4), ("stages.a", 4),
                                           ("pipeline.orchestrate.flows", 5)])
def test_layer_of(module, layer):
    assert contracts.layer_of(module) == layer


def test_upward_import_is_reported(fake):
    write(fake, "pipeline/core/x.py", "import stages.a\n")
    write(fake, "models/y.py", "from pipeline.core import params\n")
    assert contracts.layer_violations(contracts.import_graph(fake)) == [
        "models.y imports pipeline.core.params (layer 0 imports layer 1)",
        "pipeline.core.x imports stages.a (layer 1 imports layer 4)"]


def test_stage_importing_a_stage_or_the_stages_package_is_reported(fake):
    write(fake, "stages/a.py", "import stages\n\n\ndef run():\n    from stages import b\n")
    lines = contracts.layer_violations(contracts.import_graph(fake))
    assert [line.split(" (")[0] for line in lines] == ["stages.a imports stages", "stages.a imports stages.b"]


def test_siblings_importing_each_other_and_unlayered_modules_are_reported(fake):
    write(fake, "pipeline/motion/cycle.py", "from pipeline.classify.mix import mix\n")
    write(fake, "pipeline/loose.py", "")
    assert contracts.layer_violations(contracts.import_graph(fake)) == [
        "pipeline.loose is in no layer (move it into a layer's package)",
        "pipeline.motion.cycle imports pipeline.classify.mix (layer 3 imports layer 3: pipeline.motion and "
        "pipeline.classify must not import each other)"]


def test_cycles_are_found(fake):
    write(fake, "pipeline/core/params.py", "from pipeline.core.stage_cli import main\n")
    write(fake, "models/net.py", "def f():\n    import models.net\n")
    cycles = [["models.net"], ["pipeline.core.params", "pipeline.core.stage_cli"]]
    assert contracts.find_cycles(contracts.import_graph(fake)) == cycles


def test_missing_and_nonexistent_deps_are_reported(fake):
    write(fake, "pipeline/classify/extra.py", "")
    write(fake, "pipeline/classify/mix.py", "from pipeline.classify import extra\n")  # b needs it, foreach
    dvc = (fake / "dvc.yaml").read_text()
    (fake / "dvc.yaml").write_text(dvc.replace("pipeline/motion/helpers.py", "pipeline/motion/gone.py"))
    assert contracts.missing_deps(fake) == {
        "a": ["pipeline/motion/helpers.py", "pipeline/motion/gone.py (a dep that does not exist)"],
        "b": ["pipeline/classify/extra.py"]}
    assert contracts.needed_files(fake, "b") == ["models/net.py", "pipeline/classify/extra.py",
                                                 "pipeline/classify/mix.py", "stages/b.py"]


def test_registry_mismatches_are_reported(fake):
    write(fake, "params.yaml", "paths: {}\na: {}\nbb: {}\n")  # a typo for b
    dvc = (fake / "dvc.yaml").read_text()
    (fake / "dvc.yaml").write_text(dvc.replace("python -m stages.a --fast", "python -m stages.b"))
    assert contracts.registry_mismatches(fake, ("a", "b", "c")) == [
        "dvc.yaml lacks 'c'", "params.yaml lacks 'b'", "params.yaml lacks 'c'",
        "params.yaml has 'bb', not in the registry", "stages/ lacks 'c'",
        "dvc.yaml stage 'a': cmd 'python -m stages.b' is not 'python -m stages.a ...'"]


def test_registry_is_read_from_the_repo_by_default(fake):
    write(fake, "pipeline/core/registry.py", 'STAGES = ("a",)\n')
    assert contracts.registry_mismatches(fake) == ["dvc.yaml has 'b', not in the registry",
                                                   "params.yaml has 'b', not in the registry",
                                                   "stages/ has 'b', not in the registry"]


def test_non_strict_xfails_are_reported(fake):
    write(fake, "tests/sub/test_y.py", """\
        import pytest
        from pytest import mark


        @pytest.mark.xfail(reason="no strict")
        def test_a():
            pass


        @mark.xfail(strict=False)
        def test_b():
            pass


        @pytest.mark.xfail
        def test_c():
            pytest.xfail("imperative")


        @pytest.mark.parametrize("n", [1, pytest.param(2, marks=pytest.mark.xfail(strict=True))])
        def test_d(n):
            pass
        """)
    assert contracts.non_strict_xfails(fake) == [f"tests/sub/test_y.py:{line}" for line in (5, 10, 15, 17)]


def test_write_dvc_deps_adds_what_is_missing_and_keeps_data_deps(fake):
    write(fake, "dvc.yaml", """\
        stages:
          a:
            cmd: python -m stages.a
            deps:
              - stages/a.py
              - data/raw
        """)
    assert "pipeline/motion/cycle.py" in contracts.missing_deps(fake)["a"]
    assert contracts.write_dvc_deps(fake) == ["a"]
    assert contracts.missing_deps(fake) == {}
    assert "      - data/raw" in (fake / "dvc.yaml").read_text(), "data deps are kept"
    assert contracts.write_dvc_deps(fake) == []  # idempotent
