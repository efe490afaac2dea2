"""The package's layers (README, "Code map"): imports only go down, from the command line through
train, generate, model and store to the shared modules, never up. Read from the source, so a
new import that breaks the layering fails here, not in a reviewer's head."""

from __future__ import annotations

import ast
import os

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "dwave")
# Lowest first. A module may import its own layer's modules and any layer below.
LAYERS = [
    {"__init__", "errors", "versions", "files", "cores", "ranks", "stop_signal"},
    {"store"},
    {"model"},
    {"generate"},
    {"train"},
    {"cli", "demo", "slurm_scripts", "__main__"},
]


def layer_of(module: str) -> int:
    """`module` dotted below dwave (store.audio, cli): its layer's number."""
    top = module.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path[:-3], PACKAGE).replace(os.sep, ".")
                found[dotted.removesuffix(".__init__") or "__init__"] = path
    return found


def imports_of(module: str, path: str, known: set[str]) -> set[str]:
    """Every dwave module `module` imports, at its top or inside a function, dotted."""
    here = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y, from .. import z
                base = here[:len(here) - (node.level - 1)] + (node.module or "").split(".")
            elif (node.module or "").split(".")[0] == "dwave":
                base = node.module.split(".")[1:]
            else:
                continue
            base = [part for part in base if part]
            for alias in node.names:  # `from package import module` names a module
                name = ".".join(base + [alias.name])
                out.add(name if name in known else ".".join(base) or "__init__")
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("dwave.") for a in node.names
                    if a.name.startswith("dwave.")}
    return out


def test_every_module_has_a_layer():
    assert all(layer_of(m) is not None for m in modules())


def test_imports_only_go_down_the_layers():
    found = modules()
    upward = []
    for module, path in found.items():
        for target in imports_of(module, path, set(found)):
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} imports {target}")
    assert upward == []
    # The check reads real imports: train's listener uses generate's engine, generate reads
    # the run dir through model, model takes the codec's defaults from store.
    assert "generate.cpu_engine" in imports_of("train.listen", found["train.listen"], set(found))
    assert "model.rundir" in imports_of("generate.command", found["generate.command"],
                                        set(found))


def test_the_stage_packages_import_no_cycle():
    """Between packages (store, model, generate, train), no two import each other."""
    found = modules()
    edges = {(m.split(".")[0], t.split(".")[0]) for m, p in found.items()
             for t in imports_of(m, p, set(found)) if m.split(".")[0] != t.split(".")[0]}
    assert not {(a, b) for a, b in edges if (b, a) in edges}
