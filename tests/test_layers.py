"""The package's layers only import downward, and no modules import each other in a circle.

Every ``import dtk…`` counts, at the top of a module or inside a function: a lazy import is still a
dependency. A module's layer is that of its longest matching prefix below.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "dtk"

LAYERS = [
    # foundations: errors, logging, files, seeds, signals, threads, devices
    ["dtk", "dtk.errors", "dtk.logs", "dtk.signals", "dtk.threads", "dtk.seeds", "dtk.resources", "dtk.hub",
     "dtk.device", "dtk.progress", "dtk.io", "dtk.parsing"],
    # what needs no model: data reading, video and geometry, metrics and rewards, the procedural demo data
    ["dtk.data", "dtk.video", "dtk.gs", "dtk.eval", "dtk.demo", "dtk.demo.shapes", "dtk.demo.classifier",
     "dtk.demo.tracks", "dtk.demo.common"],
    ["dtk.diffusion"],          # the denoiser layer: models, schedules, guidance, samplers, loading, LoRA
    ["dtk.train"],              # the training engine
    ["dtk.methods"],            # one module per paper
    ["dtk.demo.build", "dtk.demo.pixel"],   # the scripts that build the demo models
    ["dtk.sample", "dtk.pairs", "dtk.score", "dtk.evaluate", "dtk.track3d", "dtk.render_gs"],   # the commands
    ["dtk.cli", "dtk.__main__"],
]
COMMANDS = LAYERS[-2]


def modules() -> dict[str, Path]:
    found = {}
    for f in ROOT.rglob("*.py"):
        name = ".".join(f.relative_to(ROOT.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = f
    return found


def imports(name: str, path: Path, known: dict) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: from the package, up level − 1 packages
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in known and m != name}


def layer(name: str) -> int:
    best, found = -1, None
    for i, names in enumerate(LAYERS):
        for prefix in names:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), i
    assert found is not None, f"{name}: in no layer (add it to LAYERS)"
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_layers_only_import_downward():
    upward = [f"{a} → {b}" for a, deps in graph().items() for b in deps if layer(b) > layer(a)]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_commands_do_not_import_each_other():
    """A command module is a runner over the layers below; what two commands share belongs below them."""
    def command(m):
        return any(m == c or m.startswith(c + ".") for c in COMMANDS)

    crossing = [f"{a} → {b}" for a, deps in graph().items() if command(a) for b in deps if command(b)]
    assert not crossing, "\n".join(sorted(crossing))


def test_no_import_circles():
    g = graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(g[node]):
            if state.get(dep) == "open":
                cycles.append(" → ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_test_helpers_have_one_name_each():
    """A helper shared by test modules lives in tests/helpers.py; no two modules define one name two ways."""
    seen: dict[str, str] = {}
    clashes = []
    for f in sorted((ROOT.parent / "tests").glob("*.py")):
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("test_"):
                if node.name in seen:
                    clashes.append(f"{node.name}: {seen[node.name]} and {f.name}")
                seen.setdefault(node.name, f.name)
    assert not clashes, "\n".join(clashes)
