"""Static checks of the code's architecture contracts, shared by `tests/test_contracts.py`.

Layers (a module may import its own layer and lower ones): `models` 0, `pipeline.core` 1, `pipeline.data` 2,
`pipeline.motion` and `pipeline.classify` 3 (siblings: never each other), `stages` 4 (a stage never imports
another stage nor the `stages` package), `pipeline.orchestrate` 5 (the only machinery that imports `stages`).
Imports are read with `ast`, so nothing is imported to check them; only in-repo modules count.
"""

from __future__ import annotations

import ast
import runpy
from pathlib import Path, PurePosixPath

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "pipeline", "stages")
# Longest prefix first; `pipeline` alone is the package marker every `pipeline.*` import runs.
LAYERS = {"pipeline.orchestrate": 5, "pipeline.classify": 3, "pipeline.motion": 3, "pipeline.data": 2,
          "pipeline.core": 1, "pipeline": 1, "stages": 4, "models": 0}
SIBLINGS = {"pipeline.motion", "pipeline.classify"}


def _modules(root: Path) -> dict[str, Path]:
    """Every in-repo module name -> its file (`pkg/__init__.py` for a package)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest prefix of dotted `name` that is an in-repo module, or None (outside the repo)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return None


def _imported_names(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Dotted names imported anywhere in `tree` (in functions too); `from P import N` is P.N if a module."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb from this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module name -> the in-repo modules it imports, for every .py file under models/, pipeline/, stages/."""
    modules = _modules(root)
    known = set(modules)
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        names = _imported_names(tree, module, path.name == "__init__.py", known)
        graph[module] = {hit for name in names if (hit := _resolve(name, known))}
    return graph


def _layer_package(module: str) -> str:
    """The key of LAYERS that `module` belongs to; ValueError if none."""
    for package in LAYERS:
        if module == package or module.startswith(package + "."):
            return package
    raise ValueError(f"{module} is in no layer")


def layer_of(module: str) -> int:
    """The layer rank of `module` (ValueError for a module outside every layer, e.g. `pipeline.foo`)."""
    package = _layer_package(module)
    if package == "pipeline" and module != "pipeline":
        raise ValueError(f"{module} is in no layer")
    return LAYERS[package]


def _edge_problem(a: str, b: str) -> str | None:
    """Why the import a -> b is forbidden, or None if it is allowed."""
    la, lb = layer_of(a), layer_of(b)
    if lb > la:
        return ""
    if {_layer_package(a), _layer_package(b)} == SIBLINGS:
        return ": pipeline.motion and pipeline.classify must not import each other"
    if a != b and _layer_package(a) == _layer_package(b) == "stages":
        return ": a stage must not import another stage or the stages package"
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """A line per forbidden import, "a.b imports c.d (layer X imports layer Y)", and per unlayered module."""
    lines = []
    for a in sorted(graph):
        try:
            layer_of(a)
        except ValueError as error:
            lines.append(f"{error} (move it into a layer's package)")
            continue
        for b in sorted(graph[a]):
            try:
                why = _edge_problem(a, b)
            except ValueError:
                continue  # b is unlayered: reported once as a module of its own
            if why is not None:
                lines.append(f"{a} imports {b} (layer {layer_of(a)} imports layer {layer_of(b)}{why})")
    return lines


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles: strongly connected components (Tarjan) of more than one module, or a self-import."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def module_closure(graph: dict[str, set[str]], module: str) -> set[str]:
    """`module` and every module it imports, directly or not."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(graph.get(current, ()))
    return seen


def dvc_stages(root: Path) -> dict[str, dict]:
    """dvc.yaml's stages, name -> body; a `foreach` stage gives its `do` body (the same code per item)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text()).get("stages") or {}
    return {name: spec.get("do", spec) if "foreach" in spec else spec for name, spec in stages.items()}


def needed_files(root: Path, stage: str, graph: dict[str, set[str]] | None = None) -> list[str]:
    """Sorted repo-relative module files (no `__init__.py`) in the import closure of `stages.<stage>`."""
    modules = _modules(root)
    graph = import_graph(root) if graph is None else graph
    files = (modules[m].relative_to(root).as_posix() for m in module_closure(graph, f"stages.{stage}")
             if m in modules)
    return sorted(f for f in files if not f.endswith("__init__.py"))


def _covers(dep: str, file: str) -> bool:
    """A dep covers a file if it is that file or a folder holding it."""
    dep = PurePosixPath(dep.removeprefix("./").rstrip("/"))
    return PurePosixPath(file) == dep or dep in PurePosixPath(file).parents


def missing_deps(root: Path) -> dict[str, list[str]]:
    """Stage -> code files its closure runs that its dvc.yaml deps miss, plus .py deps that do not exist."""
    graph, problems = import_graph(root), {}
    for name, spec in dvc_stages(root).items():
        deps = [d for d in spec.get("deps") or [] if isinstance(d, str) and "${" not in d]
        lines = [f for f in needed_files(root, name, graph) if not any(_covers(d, f) for d in deps)]
        lines += [f"{d} (a dep that does not exist)" for d in deps
                  if d.endswith(".py") and not (root / d).is_file()]
        if lines:
            problems[name] = lines
    return problems


def _set_diff(what: str, expected: set[str], actual: set[str]) -> list[str]:
    """Lines for names missing from / extra in `actual`."""
    return ([f"{what} lacks {name!r}" for name in sorted(expected - actual)]
            + [f"{what} has {name!r}, not in the registry" for name in sorted(actual - expected)])


def registry_mismatches(root: Path, stages: tuple[str, ...] | None = None) -> list[str]:
    """Where dvc.yaml, params.yaml or stages/*.py disagree with the registry's STAGES (read from root's
    pipeline/core/registry.py unless `stages` is given)."""
    if stages is None:
        stages = tuple(runpy.run_path(str(root / "pipeline/core/registry.py"))["STAGES"])
    dvc = dvc_stages(root)
    sections = set(yaml.safe_load((root / "params.yaml").read_text()) or {})
    modules = {p.stem for p in (root / "stages").glob("*.py")} - {"__init__"}
    lines = _set_diff("dvc.yaml", set(stages), set(dvc))
    lines += _set_diff("params.yaml", {"paths", *stages}, sections)
    lines += _set_diff("stages/", set(stages), modules)
    for name in (n for n in stages if n in dvc):
        cmd = dvc[name].get("cmd", "")
        cmd = cmd[0] if isinstance(cmd, list) and cmd else cmd
        if not (isinstance(cmd, str) and (cmd + " ").startswith(f"python -m stages.{name} ")):
            lines.append(f"dvc.yaml stage {name!r}: cmd {cmd!r} is not 'python -m stages.{name} ...'")
    return lines


def _dotted(node: ast.AST) -> str:
    """`pytest.mark.xfail` for that attribute chain; '' for anything else."""
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else ""
    return node.id if isinstance(node, ast.Name) else ""


def _is_xfail(node: ast.AST) -> bool:
    name = _dotted(node)
    return name == "pytest.xfail" or name == "mark.xfail" or name.endswith(".mark.xfail")


def non_strict_xfails(root: Path) -> list[str]:
    """"file:line" of each xfail under tests/ without `strict=True`: `pytest.mark.xfail(...)` without it,
    a bare `pytest.mark.xfail` and `pytest.xfail(...)` (which cannot be strict)."""
    hits = []
    for path in sorted((root / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _is_xfail(n.func)]
        called = {id(call.func) for call in calls}
        bare = [n for n in ast.walk(tree)
                if isinstance(n, ast.Attribute) and _is_xfail(n) and id(n) not in called]
        strict = [c for c in calls if any(k.arg == "strict" and isinstance(k.value, ast.Constant)
                                          and k.value.value is True for k in c.keywords)]
        rel = path.relative_to(root).as_posix()
        hits += [(rel, n.lineno) for n in calls + bare if n not in strict]
    return [f"{rel}:{line}" for rel, line in sorted(hits)]


def write_dvc_deps(root: Path = REPO) -> list[str]:
    """Rewrite each dvc.yaml stage's code deps (the `.py` entries of its `deps:` list) to exactly the
    files its imports need, keeping its data deps, comments and layout; returns the stages changed.
    Run `python -m tests.contracts` after changing what a stage imports."""
    path = root / "dvc.yaml"
    lines, out, changed = path.read_text().splitlines(), [], []
    graph, stage, i = import_graph(root), None, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            stage = line.strip().rstrip(":")
        out.append(line)
        i += 1
        if line.strip() != "deps:" or stage is None:
            continue
        indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
        block = []
        while i < len(lines) and lines[i].startswith(indent + "- "):
            block.append(lines[i][len(indent) + 2:])
            i += 1
        code = [d for d in block if d.endswith(".py")]
        wanted = needed_files(root, stage, graph)
        changed += [stage] if sorted(code) != wanted else []
        out += [f"{indent}- {d}" for d in wanted + [d for d in block if not d.endswith(".py")]]
    path.write_text("\n".join(out) + "\n")
    return changed


if __name__ == "__main__":
    print("dvc.yaml code deps rewritten for:", ", ".join(write_dvc_deps()) or "none (all current)")
