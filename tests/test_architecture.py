"""The house's rules, read from the source: no import cycle among segtrain's modules, no library module importing
a command (segtrain.apps), no module importing another's private name, and imports inside functions only with a
one-line reason (start-up time or an optional package)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "segtrain"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _runtime_imports(tree: ast.Module) -> list[tuple[ast.AST, bool]]:
    """(import node, inside a function) for every import that runs (not under ``if TYPE_CHECKING:``)."""
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for n in ast.walk(node)}
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(node) if n is not node}
    return [
        (node, id(node) in in_function)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in typing_only
    ]


def _graph() -> dict[str, set[str]]:
    """module -> the segtrain modules it imports (a name imported from a package counts as its submodule when
    there is one)."""
    modules, graph = _modules(), {}
    for name, path in modules.items():
        deps = set()
        for node, _ in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
            elif node.module and node.module.startswith("segtrain"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in modules else node.module)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_library_module_imports_a_command():
    graph = _graph()
    assert "segtrain.apps.train" in graph and "segtrain.trainer" in graph
    library = [m for m in graph if not m.startswith("segtrain.apps") and m != "segtrain.__main__"]
    offenders = {m: sorted(d for d in graph[m] if d.startswith("segtrain.apps")) for m in library}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_no_module_imports_another_modules_private_name():
    offenders = []
    for name, path in _modules().items():
        for node, _ in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("segtrain"):
                offenders += [
                    f"{name}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.endswith("__")
                ]
    assert offenders == []


def test_imports_inside_functions_say_why():
    """An import inside a function is for start-up time (``--help``, a refused command) or an optional package;
    the first such import of each function says why in a comment (on its line or the line before)."""
    unexplained = []
    for name, path in _modules().items():
        source = path.read_text()
        lines, tree = source.splitlines(), ast.parse(source)
        runtime = {id(node) for node, inside in _runtime_imports(tree) if inside}
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            own = [n for n in ast.walk(function) if id(n) in runtime and _enclosing(function, n)]
            if own:
                first = min(own, key=lambda n: n.lineno)
                here, before = lines[first.lineno - 1], lines[first.lineno - 2].strip()
                if "#" not in here and not before.startswith("#"):
                    unexplained.append(f"{name}:{first.lineno}: {here.strip()}")
    assert unexplained == []


def _enclosing(function: ast.AST, node: ast.AST) -> bool:
    """Whether ``function`` is the innermost function around ``node``."""
    for child in ast.iter_child_nodes(function):
        if child is node:
            return True
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and _enclosing(child, node):
            return True
    return False
