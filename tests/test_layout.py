"""The layout: the project's modules import one another one way (no cycle), each opens with a
docstring saying what it owns, dit4dit.py stays the readable method file, and setup.py installs
every module."""
import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "bridges", "suites", "bench")
SCRIPTS = ("dit4dit", "eval_sim", "train_toy")


def project_modules():
    """module name -> path of every project module (the scripts, the packages; not the tests)."""
    modules = {name: ROOT / f"{name}.py" for name in SCRIPTS}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def imports_at_load(path, modules, package):
    """The project modules `path` imports when it is loaded (module level, not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                base = package + ("." + base if base else "")
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_no_import_cycle_among_the_projects_modules():
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        graph[name] = imports_at_load(path, modules, package) - {name}
    # a submodule also loads its package first
    for name in modules:
        if "." in name:
            graph[name].add(name.split(".")[0])
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):  # a package importing its own submodule is not a cycle
                continue
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert graph["dit4dit"] <= {"kernels", "kernels.dispatch", "bridges", "bridges.inputs"}
    assert "eval_sim" not in set().union(*(graph[m] for m in modules if m not in ("train_toy",)))


def test_every_module_opens_with_a_docstring_of_what_it_owns():
    for name, path in project_modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.split()) >= 6, f"{path.relative_to(ROOT)} has no opening docstring"


def test_the_method_file_stays_short_and_the_code_cites_no_private_documents():
    lines = (ROOT / "dit4dit.py").read_text().splitlines()
    assert len(lines) <= 1100
    assert max(len(line) for line in lines) <= 100
    tests = [p for p in sorted((ROOT / "tests").glob("*.py")) if p.name != "test_layout.py"]
    for path in [*project_modules().values(), *tests]:
        text = path.read_text()
        assert "DESIGN §" not in text and "DESIGN 3." not in text, path
        assert not re.search(r"\(issue \d+\)|\bissue \d+\b", text), path


def test_setup_installs_every_module():
    setup = (ROOT / "setup.py").read_text()
    for name in SCRIPTS:
        assert f'"{name}"' in setup
    for package in PACKAGES:
        assert f'"{package}"' in setup
