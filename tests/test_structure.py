"""The structure holds: no import cycle anywhere in dblocks/ or experiments/ (imports inside functions included),
modules stay small, the library and the commands never reach into tests or the lab, and every entry point follows one
convention (docs/design.md, Layout)."""
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


def _entry_points() -> dict[str, pathlib.Path]:
    """Modules of experiments/ run as `python -m ...`: the ones with an `if __name__ == "__main__":` block."""
    return {n: p for n, p in _modules().items()
            if n.startswith("experiments.") and "__name__ == \"__main__\"" in p.read_text()}


def entry_point_problems(sources: dict[str, str]) -> list[str]:
    """'module: problem' for an entry point that parses its own flags (argparse, app.run) instead of run_main."""
    problems = []
    for name, text in sources.items():
        tree = ast.parse(text)
        calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        imports = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        if "argparse" in imports:
            problems.append(f"{name}: imports argparse (use absl flags)")
        if "app.run" in calls:
            problems.append(f"{name}: calls app.run (use experiments.common.run_main)")
        if "run_main" not in calls:
            problems.append(f"{name}: does not call run_main")
    return problems


def test_every_entry_point_uses_run_main():
    """One convention: absl flags, and run_main's messages and exit statuses for bad flags and user errors."""
    entries = _entry_points()
    assert {"experiments.train", "experiments.bench", "experiments.lab.solver_toy"} <= set(entries)
    problems = entry_point_problems({n: p.read_text() for n, p in entries.items()})
    assert not problems, "\n".join(problems)


def test_entry_point_checker_sees_other_conventions():
    bad = {"a": "import argparse\nif __name__ == '__main__':\n    argparse.ArgumentParser()\n",
           "b": "from absl import app\nif __name__ == '__main__':\n    app.run(main)\n",
           "c": "from experiments.common import run_main\nif __name__ == '__main__':\n    run_main(main)\n"}
    assert entry_point_problems(bad) == ["a: imports argparse (use absl flags)", "a: does not call run_main",
                                         "b: calls app.run (use experiments.common.run_main)",
                                         "b: does not call run_main"]


def test_nothing_imports_tests_and_only_the_lab_imports_the_lab():
    """The library and the commands stand without tests/ and without the lab wing (experiments/lab/)."""
    modules, graph = _modules(), import_graph()
    bad = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{name} imports {t}" for t in names if t == "tests" or t.startswith("tests.")]
        if not name.startswith("experiments.lab"):
            bad += [f"{name} imports {t}" for t in graph[name] if t.startswith("experiments.lab")]
    assert not bad, bad


def test_experiments_call_no_private_library_function():
    """Commands and lab drivers use the library's public names only (a private one may change without notice)."""
    bad = []
    for name, path in _modules().items():
        if not name.startswith("experiments"):
            continue
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                   and (n.module or "").startswith("dblocks") for a in n.names}
        for n in ast.walk(tree):
            if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
                    and n.attr.startswith("_") and not n.attr.startswith("__")):
                bad.append(f"{name}: {n.value.id}.{n.attr}")
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("dblocks"):
                bad += [f"{name}: from {n.module} import {a.name}" for a in n.names if a.name.startswith("_")]
    assert not bad, bad


def _task_imports(tree: ast.AST) -> set[str]:
    """Names a module binds to other task modules or their functions (`from dblocks.tasks import dit_eval`,
    `from dblocks.tasks.lm import decode as lm_decode`, `import dblocks.tasks.x as y`,
    `from dblocks.tasks.x import f`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dblocks.tasks"):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.name.startswith("dblocks.tasks.") and a.asname}
    return names


def task_forwarders(source: str) -> list[str]:
    """'Class.method -> call' for each method whose whole body (after its docstring) is `return f(self, ...)` or
    `return module.f(self, ...)` with f from another task module: a task cut in two files that call each other."""
    tree = ast.parse(source)
    imported, found = _task_imports(tree), []
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
            body = fn.body[1:] if ast.get_docstring(fn) is not None else fn.body
            if len(body) != 1 or not isinstance(body[0], ast.Return) or not isinstance(body[0].value, ast.Call):
                continue
            call = body[0].value
            root = call.func.value if isinstance(call.func, ast.Attribute) else call.func
            passes_self = any(isinstance(a, ast.Name) and a.id == "self" for a in call.args)
            if isinstance(root, ast.Name) and root.id in imported and passes_self:
                found.append(f"{cls.name}.{fn.name} -> {ast.unparse(call.func)}")
    return found


def test_each_task_lives_in_one_home():
    """A task's training, sampling and evaluation are methods of its own class: no `*_eval` / `*_infer` module beside
    it, and no method that only hands `self` to a function of another task module (docs/design.md, Layout)."""
    modules = {n: p for n, p in _modules().items() if n.startswith("dblocks.tasks")}
    split = [n for n in modules if n.rpartition(".")[2].endswith(("_eval", "_infer"))]
    assert not split, f"task modules cut in two: {split}"
    bad = {n: f for n, p in modules.items() if (f := task_forwarders(p.read_text()))}
    assert not bad, f"methods that forward to another task module: {bad}"


def test_forwarder_checker_sees_a_forwarder():
    src = ('from dblocks.tasks import dit_eval\nfrom dblocks.tasks.lm.decode import helper\n'
           'class T:\n    def evaluate(self, run, **o):\n        """Doc."""\n'
           '        return dit_eval.evaluate(self, run, **o)\n'
           '    def decode(self, run):\n        return helper(self, run)\n'
           '    def own(self, run):\n        return run.task.evaluate(run)\n'
           '    def no_self(self, run):\n        return helper(run)\n')
    assert task_forwarders(src) == ["T.evaluate -> dit_eval.evaluate", "T.decode -> helper"]


def outside_writes(source: str) -> list[str]:
    """Writes into a task object from outside its class: `setattr(task, ...)` or `task.__dict__[...] = ...` on any
    expression naming a task (a cache belongs to the task: a cached_property or an attribute set in __init__)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                and node.args and "task" in ast.unparse(node.args[0])):
            found.append(ast.unparse(node))
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                if (isinstance(t, ast.Subscript) and isinstance(t.value, ast.Attribute) and t.value.attr == "__dict__"
                        and "task" in ast.unparse(t.value.value)):
                    found.append(ast.unparse(t))
    return sorted(found)


def test_nothing_writes_into_a_task_from_outside():
    bad = {n: w for n, p in _modules().items() if (w := outside_writes(p.read_text()))}
    assert not bad, f"task state set from outside the task: {bad}"


def test_outside_write_checker_sees_setattr_and_dict_writes():
    src = ("def f(task, run, obj):\n    setattr(task, '_cache', 1)\n    run.task.__dict__['_vocab'] = 2\n"
           "    setattr(obj, 'x', 3)\n    self.__dict__['vocab'] = 4\n")
    assert outside_writes(src) == ["run.task.__dict__['_vocab']", "setattr(task, '_cache', 1)"]


# The config module owns the defaults (its builders and each task's `defaults`); user_data resolves the data fields
# of configs that are not validated yet (older runs' saved configs included), where an absent field is the point.
CONFIG_GET_ALLOWED = {"dblocks.config", "dblocks.user_data", "dblocks.run_record"}   # run_record: saved metas


def _is_part_of(value: ast.AST) -> bool:
    """A name, attribute or item (or a tuple of them): what `m = config.model` binds, unlike a call's result."""
    if isinstance(value, ast.Tuple):
        return all(_is_part_of(v) for v in value.elts)
    return isinstance(value, (ast.Name, ast.Attribute, ast.Subscript))


def config_get_calls(source: str) -> list[str]:
    """`X.get("field", ...)` calls on a config: X names `config` (self.config.model, run.config) or a local name bound
    to one (`m = self.config.model`, `c = config; d = c.data`). Every field has its default in the config module, so
    a read site states none of its own."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        bound, grew = {a.arg for a in fn.args.args if "config" in a.arg}, True
        while grew:   # names bound to a config, or to a part of one, anywhere in the function
            grew = False
            for node in ast.walk(fn):
                if not isinstance(node, ast.Assign) or not _is_part_of(node.value):
                    continue
                names = {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
                if "config" in ast.unparse(node.value) or names & bound:
                    new = {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)} - bound
                    bound |= new
                    grew = grew or bool(new)
        for node in ast.walk(fn):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                recv = node.func.value
                roots = {n.id for n in ast.walk(recv) if isinstance(n, ast.Name)}
                if "config" in ast.unparse(recv) or roots & bound:
                    found.append(ast.unparse(node))
    return sorted(set(found))


def test_config_fields_are_read_without_inline_defaults():
    bad = {n: calls for n, p in _modules().items() if n not in CONFIG_GET_ALLOWED
           and (calls := config_get_calls(p.read_text()))}
    assert not bad, f"config fields read with an inline default (give the field a default in the config module): {bad}"


def test_config_get_checker_sees_bound_names():
    src = ("def f(self, config, meta):\n    m = self.config.model\n    c = config\n    d = c.data\n"
           "    n = int(d.n)\n    r = run(n)\n"
           "    return m.get('a', 0), d.get('b'), meta.get('c'), config.get('e', 1), m.a, r.get('f')\n")
    assert config_get_calls(src) == ["config.get('e', 1)", "d.get('b')", "m.get('a', 0)"]


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
