"""The import graph of the library: layers import only downward, no module reads another
module's private names, the library never imports the tools wing or loads repository
scripts, and docs/ARCHITECTURE.md names every module there is."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Layers of the library, bottom first: a module imports from its own layer or below.
LAYERS = [
    {"ggcomm.errors", "ggcomm._parallel", "ggcomm._params", "ggcomm._host", "ggcomm.kernels",
     "ggcomm.kernels.eg", "ggcomm.kernels.reference", "ggcomm.kernels._intrinsics",
     "ggcomm.kernels.rf8"},
    {"ggcomm.codec", "ggcomm.gg", "ggcomm.rf8"},
    {"ggcomm.quant"},
    {"ggcomm.rate", "ggcomm.rate.bits", "ggcomm.rate.model", "ggcomm.rate.differentiable"},
    {"ggcomm.step_policy"},
    {"ggcomm.methods", "ggcomm.methods.init", "ggcomm.methods.act", "ggcomm.methods.gct",
     "ggcomm.methods.backslash", "ggcomm.methods.deepshape"},
    {"ggcomm.transport", "ggcomm.exchange"},
    {"ggcomm.ddp", "ggcomm.pipeline", "ggcomm.weights", "ggcomm.fsdp",
     "ggcomm.powersgd", "ggcomm.diloco"},
    {"ggcomm.deepspeed", "ggcomm.pipelining"},
]
LAYER = {name: i for i, layer in enumerate(LAYERS) for name in layer}
TRANSPORTS = {"ggcomm.transport", "ggcomm.exchange", "ggcomm.ddp", "ggcomm.pipeline",
              "ggcomm.deepspeed", "ggcomm.pipelining", "ggcomm.weights", "ggcomm.fsdp",
              "ggcomm.powersgd", "ggcomm.diloco"}


def _modules() -> dict[str, Path]:
    out = {}
    for base, pkg in ((ROOT / "ggcomm", "ggcomm"), (ROOT / "kernels", "ggcomm.kernels")):
        for path in sorted(base.rglob("*.py")):
            if "kernels" in path.relative_to(ROOT).parts[:2] and base.name == "ggcomm":
                continue  # the link to kernels/ in some checkouts
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every ggcomm import of a module."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("ggcomm"):
                continue
            names = [a.name for a in node.names]
            # `from ggcomm import codec` imports the module ggcomm.codec
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            if subs:
                found += [(s, [], node.lineno) for s in subs]
                names = [n for n in names if f"{target}.{n}" not in MODULES]
            if names:
                found.append((target, names, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names
                      if a.name.startswith("ggcomm")]
    return found


def _owner(target: str) -> str:
    """The module a dotted import lands in (the deepest one that exists)."""
    while target not in MODULES and "." in target:
        target = target.rpartition(".")[0]
    return target


# the package root and `python -m ggcomm` (the command) stand outside the layers
LIBRARY = [m for m in MODULES
           if not m.startswith("ggcomm.tools") and m not in ("ggcomm", "ggcomm.__main__")]


def test_every_library_module_has_a_layer() -> None:
    assert sorted(set(LIBRARY) - set(LAYER)) == []


@pytest.mark.parametrize("name", LIBRARY)
def test_imports_go_only_downward_and_never_to_the_tools(name: str) -> None:
    for target, _, line in _imports(name, MODULES[name]):
        owner = _owner(target)
        if owner == "ggcomm":  # the package root: __version__ and the codec's names
            continue
        assert not owner.startswith("ggcomm.tools"), f"{name}:{line} imports {owner}"
        assert LAYER[owner] <= LAYER[name], f"{name}:{line} imports {owner} from above"
        if name.startswith("ggcomm.methods"):
            assert owner not in TRANSPORTS, f"{name}:{line}: a method imports a transport"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_reads_another_modules_private_names(name: str) -> None:
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    aliases = set()
    for target, names, line in _imports(name, path):
        owner = _owner(target)
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert owner == name or not private, f"{name}:{line} imports {private} from {owner}"
    for node in ast.walk(tree):  # ggcomm module aliases: `from .. import rate as _rate`
        if isinstance(node, ast.ImportFrom) and (node.level or
                                                 (node.module or "").startswith("ggcomm")):
            aliases.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            aliases.update(a.asname or a.name.split(".")[0] for a in node.names
                           if a.name.startswith("ggcomm"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            raise AssertionError(f"{name}:{node.lineno} reads {node.value.id}.{node.attr}")


@pytest.mark.parametrize("name", LIBRARY)
def test_no_library_module_loads_a_repository_script(name: str) -> None:
    text = MODULES[name].read_text()
    assert "spec_from_file_location" not in text and "launch/" not in text, name


def test_the_architecture_page_names_every_module() -> None:
    page = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    paths = re.findall(r"`([a-z0-9_]+(?:/[a-z0-9_]+)*)(?:\.py|/)`", page)
    named = {m.split("/")[-1] for m in paths}
    for name in MODULES:
        if name == "ggcomm":
            continue
        leaf = name.split(".")[-1]
        assert leaf in named or leaf.startswith("_"), f"{name} is not in ARCHITECTURE.md"
