"""The import layering holds: read from the source, so a new import that breaks it fails here.

- the broker routes on headers and never unpickles: it imports no pickler (pickle, cloudpickle,
  nothing of fabric.serde), and starting it loads neither serde nor the driver's API;
- fabric.serde has one concern per module and no import cycle among them;
- the core (everything but ml, serve, apps and the command line) never imports fabric.ml,
  fabric.serve or fabric.apps;
- fabric.ml, fabric.serve and fabric.apps sit on the public core API and fabric.storage: they do
  not import the broker, the executor or the wire format.
"""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fabric")
UPPER = ("fabric.ml", "fabric.serve", "fabric.apps")
# the front doors may reach the upper layers (lazily): the CLI's commands, fabric.App/lookup
FRONT = {"fabric.cli", "fabric"}


def _modules():
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                yield rel[:-9] if rel.endswith(".__init__") else rel, path


def _imports(name, path):
    """Every module ``name`` imports, absolute, wherever the import statement is (lazy ones too)."""
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod, node.lineno
            for a in node.names:  # `from . import serde` imports the module fabric.serde
                yield f"{mod}.{a.name}", node.lineno


def _violations(where, forbidden):
    out = []
    for name, path in _modules():
        if not where(name):
            continue
        for mod, line in _imports(name, path):
            if any(mod == f or mod.startswith(f + ".") for f in forbidden):
                out.append(f"{name} (line {line}) imports {mod}")
    return out


PICKLERS = ["pickle", "cloudpickle", "fabric.serde"]


def test_the_broker_never_unpickles():
    broker = lambda n: n.startswith("fabric.broker")  # noqa: E731
    assert _violations(broker, PICKLERS) == []


def test_starting_the_broker_loads_no_pickler_nor_the_driver():
    """What the source check above cannot see: a module's package ``__init__`` runs too."""
    import subprocess
    import sys

    probe = ("import sys, fabric.broker.core, fabric.broker.__main__; "
             "print(sorted(m for m in sys.modules if m == 'cloudpickle' or m.startswith(('fabric.serde', 'fabric.api', "
             "'fabric.connection', 'fabric.ml', 'fabric.serve', 'fabric.apps'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(ROOT))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_shared_memory_allocator_holds_no_pickler():
    """What lets the broker import it: no pickle, and nothing of serde's that pickles."""
    assert _violations(lambda n: n == "fabric.serde.shm", PICKLERS) == []
    assert "fabric.serde.shm" in dict(_modules())  # the check above looked at a real module


def test_serde_has_no_import_cycles():
    assert not _cycles("fabric.serde"), _cycles("fabric.serde")


def test_the_core_never_imports_the_upper_layers():
    core = lambda n: not n.startswith(UPPER) and n not in FRONT  # noqa: E731
    assert _violations(core, list(UPPER)) == []


@pytest.mark.parametrize("layer", UPPER)
def test_upper_layers_use_only_the_public_core(layer):
    internals = ["fabric.broker", "fabric.executor", "fabric.protocol", "fabric.client", "fabric.connection",
                 "fabric.futures", "fabric.control", "fabric.spill"]
    assert _violations(lambda n: n.startswith(layer), internals) == []


def test_control_clients_do_not_import_the_driver():
    """The autoscaler, `fabric status`/`stop` and a cluster stopping its broker ask through
    fabric.control: none of them loads the driver's connection or its Futures."""
    driver = ["fabric.client", "fabric.connection", "fabric.futures", "fabric.api"]
    users = ("fabric.autoscale", "fabric.control", "fabric.cluster")
    assert _violations(lambda n: n.startswith(users), driver) == []


def _cycles(package, mods=None):
    """Import cycles among the modules of ``package`` (lazy imports included), as name lists."""
    mods = mods or {name: path for name, path in _modules() if name == package or name.startswith(package + ".")}
    graph = {name: sorted({m for m, _ in _imports(name, path) if m in mods and m != name})
             for name, path in mods.items()}
    cycles, done = [], set()

    def visit(name, stack):
        if name in stack:
            cycles.append(stack[stack.index(name):] + [name])
            return
        if name in done:
            return
        for nxt in graph[name]:
            visit(nxt, stack + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    return cycles


def test_storage_has_no_import_cycles():
    """store.py is the storage layer's one abstraction; objects.py and the package's default
    store sit on it, and nothing below imports what sits above (not even lazily)."""
    assert not _cycles("fabric.storage"), _cycles("fabric.storage")
    store = dict(_modules())["fabric.storage.store"]
    assert not [m for m, _ in _imports("fabric.storage.store", store) if m.startswith("fabric.storage")]


def test_the_checker_sees_a_violation(tmp_path):
    """The check itself can fail: a lazy import inside a function is found."""
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from ..broker import core\n")
    assert ("fabric.broker.core", 2) in set(_imports("fabric.ml.m", str(p)))


def test_the_cycle_checker_sees_a_lazy_circle(tmp_path):
    (tmp_path / "__init__.py").write_text("from .a import x\n")
    (tmp_path / "a.py").write_text("x = 1\ndef f():\n    from . import b\n")
    (tmp_path / "b.py").write_text("from .a import x\n")
    mods = {"p": str(tmp_path / "__init__.py"), "p.a": str(tmp_path / "a.py"), "p.b": str(tmp_path / "b.py")}
    assert ["p.a", "p.b", "p.a"] in _cycles("p", mods)
