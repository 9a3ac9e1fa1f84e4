"""The import structure of lt_utils and the entry scripts: no import cycles, and every import goes down the layer
table of lt_utils/__init__.py. Imports inside functions count: they still run, so they still tie modules together.
Also: comments and docstrings state their reasons instead of citing documents that are not in the repository."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lt_utils"
SCRIPT_DIRS = (".", "data_scripts", "scripts")  # the entry scripts: every .py file directly in these folders

# Known exceptions (none now): an entry says which import or citation is allowed for the time being, and why
KNOWN_BACK_EDGES = set()
KNOWN_CITATIONS = set()


# ------------------------------------------------------------------------------------------------ the import graph


def module_files():
    """{dotted module name: path} for the package and the entry scripts."""
    files = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for folder in SCRIPT_DIRS:
        for path in sorted((ROOT / folder).glob("*.py")):
            files[".".join(path.relative_to(ROOT).with_suffix("").parts)] = path
    return files


def _known(name, modules):
    """The module `name` runs: itself, else the closest enclosing one we know (a package's attribute); None outside."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imported(name, path, modules):
    """{imported module: first line} for every import anywhere in the file, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = {}

    def absolute(module, level):
        if not level:
            return module
        base = package.split(".")[: len(package.split(".")) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node.module, node.level)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "_lazy")):
            # importlib.import_module(".x", __package__) and config's _lazy(".x", ...) import x when called
            module = node.args[0].value
            targets = [absolute(module.lstrip("."), len(module) - len(module.lstrip(".")))]
        for target in targets:
            target = _known(target, modules)
            if target is not None and target != name:
                found.setdefault(target, node.lineno)
    return found


@pytest.fixture(scope="module")
def graph():
    modules = module_files()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def find_cycle(graph):
    """A list [a, b, ..., a] of modules that import each other in a ring, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def without_known(graph):
    return {a: {b: line for b, line in deps.items() if (a, b) not in KNOWN_BACK_EDGES} for a, deps in graph.items()}


def test_no_import_cycle(graph):
    cycle = find_cycle(without_known(graph))
    assert cycle is None, "import cycle (each module with the line that imports the next): " + " -> ".join(
        f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_known_back_edges_still_exist(graph):
    stale = sorted((a, b) for a, b in KNOWN_BACK_EDGES if b not in graph.get(a, {}))
    assert not stale, f"these imports are gone: remove them from KNOWN_BACK_EDGES: {stale}"


# ------------------------------------------------------------------------------------------------ layers


def layer_table():
    """[(level, group, module name or prefix.)] from the table in lt_utils/__init__.py's docstring."""
    doc = ast.get_docstring(ast.parse((ROOT / PACKAGE / "__init__.py").read_text()))
    rows = []
    for level, group, names in re.findall(r"^ +(\d+) +(\w+) +(.+)$", doc, re.MULTILINE):
        for entry in names.split():
            if entry.endswith(".py"):  # an entry script, by its path
                name = entry[:-3].replace("/", ".")
            else:
                name = PACKAGE if entry == "__init__" else f"{PACKAGE}.{entry}"
            rows.append((int(level), group, name[:-1] if name.endswith("*") else name))
    return rows


def placed(modules):
    """{module: (level, group)}; a `pkg.*` row places every module under pkg."""
    rows = layer_table()
    exact = {name: (level, group) for level, group, name in rows if not name.endswith(".")}
    prefixes = [(name, (level, group)) for level, group, name in rows if name.endswith(".")]
    return {m: exact.get(m) or next((lg for p, lg in prefixes if m.startswith(p)), None) for m in modules}


def test_layer_table_places_every_module_once(graph):
    rows = layer_table()
    names = [name for _, _, name in rows]
    assert len(rows) > 10 and len(names) == len(set(names)), f"the layer table lists a module twice: {names}"
    where = placed(graph)
    unplaced = sorted(m for m, lg in where.items() if lg is None)
    assert not unplaced, f"add these modules to the layer table in lt_utils/__init__.py: {unplaced}"
    unknown = sorted(n for n in names if not any(m == n or m.startswith(n) for m in graph))
    assert not unknown, f"the layer table lists modules that do not exist: {unknown}"


def test_imports_go_down_the_layers(graph):
    where = placed(graph)
    upward = []
    for importer, deps in without_known(graph).items():
        (level, group) = where[importer]
        for dep, line in sorted(deps.items()):
            dep_level, dep_group = where[dep]
            if dep_group != group and dep_level >= level:
                upward.append(f"{importer} (layer {level} {group}) imports {dep} (layer {dep_level} {dep_group}) "
                              f"at line {line}")
    assert not upward, "imports against the layer order of lt_utils/__init__.py:\n" + "\n".join(upward)


# ------------------------------------------------------------------------------------------------ citations

# documents that are not in the repository (spelled so that this file does not match itself)
OUTSIDE_DOCS = re.compile(r"\b(hf[_]stack|lt[_]methods)\b")


def source_files():
    skip = {"build", "dist", "venv", "__pycache__"}
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if path.suffix in (".py", ".sh") and not any(p.startswith(".") or p in skip for p in rel.parts):
            yield rel.as_posix(), path


def test_no_comment_cites_an_outside_document():
    citing = {rel: [n for n, line in enumerate(path.read_text().splitlines(), 1) if OUTSIDE_DOCS.search(line)]
              for rel, path in source_files()}
    citing = {rel: lines for rel, lines in citing.items() if lines}
    new = {rel: lines for rel, lines in citing.items() if rel not in KNOWN_CITATIONS}
    assert not new, f"say the reason instead of citing a document outside the repository: {new}"
    stale = sorted(KNOWN_CITATIONS - set(citing))
    assert not stale, f"these no longer cite one: remove them from KNOWN_CITATIONS: {stale}"
