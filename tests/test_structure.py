"""The structure holds: no import cycle anywhere in dblocks/ or experiments/ (imports inside functions included), and
modules stay small (docs/design.md, Layout)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("dblocks", "experiments")
MAX_LINES = 420


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: pathlib.Path, name: str, modules: dict) -> set[str]:
    """Project modules that `name` imports anywhere in its file (module level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[:len(base) - node.level + 1] + ([mod] if mod else []))
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in modules:  # 'dblocks.tasks.base.Task' -> 'dblocks.tasks.base'
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    for name in graph:  # a package's __init__ is run by importing any of its modules: not an edge we care about
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_sees_function_level_imports(tmp_path):
    """The checker itself: a cycle closed by an import inside a function is found."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    import a\n")
    mods = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    graph = {n: _imports(p, n, mods) for n, p in mods.items()}
    assert find_cycle(graph) == ["a", "b", "a"]


def test_modules_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in _modules().values()
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_requirements_and_pyproject_agree():
    """requirements.txt (pip install -r) and pyproject.toml (pip install -e .) name the same packages."""
    import re
    import tomllib
    name = lambda spec: re.split(r"[<>=!\[ ;]", spec.strip(), maxsplit=1)[0].lower()  # noqa: E731
    req = {name(ln) for ln in (ROOT / "requirements.txt").read_text().splitlines()
           if ln.strip() and not ln.startswith("#")}
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {name(d) for d in proj["dependencies"]} | {name(d) for d in proj["optional-dependencies"]["dev"]}
    assert req == deps, (req ^ deps)
