"""The package's layers: every module imports only its own layer and the ones before it, there is
no import circle, each module imports alone, and the model layer needs no Ray."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["model", "core", "database", "retrieval", "training", "serving", "evaluation", "top"]
"""In order: a module may import from its layer and the layers before it, never after."""


def modules() -> dict[str, Path]:
    found = {}
    for package in ("retro_ray", "index_actors"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer(module: str) -> int:
    if module.startswith("index_actors"):
        return LAYERS.index("retrieval")
    parts = module.split(".")
    return LAYERS.index(parts[1] if len(parts) > 2 or parts[1:] and parts[1] in LAYERS else "top")


def imports(path: Path, known: set[str]) -> set[str]:
    """Every retro-ray module a file imports, at its top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                out.add(name if name in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in known and m != "retro_ray"}


def test_imports_point_down_the_layers_and_never_form_a_circle():
    found = modules()
    graph = {m: imports(p, set(found)) for m, p in found.items()}
    upward = [(m, i) for m, deps in graph.items() for i in deps if layer(i) > layer(m)]
    assert upward == [], upward
    assert {LAYERS[layer(m)] for m in found} == set(LAYERS)  # every layer has modules, none is unknown
    visiting, done = [], set()

    def visit(m: str) -> None:  # depth first: a module met again on the current path closes a circle
        if m in done:
            return
        assert m not in visiting, f"import circle: {' -> '.join(visiting[visiting.index(m):] + [m])}"
        visiting.append(m)
        for dep in sorted(graph[m]):
            visit(dep)
        visiting.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_each_module_imports_alone_and_the_model_needs_no_ray():
    names = sorted(modules())
    script = f"""
import importlib, sys
failed = []
for name in {names!r}:
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("retro_ray", "index_actors")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{{name}}: {{type(e).__name__}}: {{e}}")
print("\\n".join(failed) or "all imported")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.stdout.strip() == "all imported", done.stdout + done.stderr[-2000:]
    bare = "import retro_ray.model.io, retro_ray.serving.generate, sys; " \
           "print(sorted(m for m in ('ray', 'pydantic') if m in sys.modules))"
    # generation and the model import no Ray (a bare GPU box); the model not even pydantic
    done = subprocess.run([sys.executable, "-c", bare], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "'ray'" not in done.stdout, done.stdout + done.stderr[-2000:]
    model_only = "import retro_ray.model.io, sys; print('pydantic' in sys.modules or 'ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", model_only], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.stdout.strip() == "False", done.stdout + done.stderr[-2000:]
