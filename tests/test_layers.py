"""The package's architecture, checked: every module lives in a layer folder, imports point down the
layers (or within a folder), and no import cycle exists. `python tests/test_layers.py` prints the graph's
figures (modules, layers, imports, cycles, imports pointing up)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cnnsql"
# bottom to top: a module may import from its own folder and from folders listed before it
LAYERS = ["core", "db", "models", "engines", "data", "measure", "placements", "results", "bench", "cli"]
TOP = {"cnnsql", "cnnsql.__main__"}  # the package itself and `python -m cnnsql` (the command line)


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """cnnsql modules imported anywhere in the file (module level and inside functions)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.add(sub if sub in known else mod)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != name}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def graph():
    mods = modules()
    return mods, {m: imports(m, p, set(mods)) for m, p in mods.items()}


def upward(edges) -> list[tuple[str, str]]:
    bad = []
    for src, targets in edges.items():
        if src in TOP:
            continue
        for dst in targets:
            ls, ld = layer(src), layer(dst)
            if dst in TOP or ls is None or ld is None or LAYERS.index(ld) > LAYERS.index(ls):
                bad.append((src, dst))
    return sorted(bad)


def cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_every_module_lives_in_a_layer_folder():
    mods, _ = graph()
    stray = [m for m in mods if m not in TOP and layer(m) is None]
    assert not stray, f"modules outside the layer folders {LAYERS}: {stray}"


def test_imports_point_down_the_layers():
    _, edges = graph()
    assert upward(edges) == []


def test_no_import_cycles():
    _, edges = graph()
    assert cycles(edges) == []


def shape_literals() -> list[str]:
    """Code (not comments or docstrings) outside core/config.py that spells CIFAR-10's image shape."""
    import re
    pattern = re.compile(r"\(\s*3\s*,\s*32\s*,\s*32\s*\)|\b3072\b|\(\s*32\s*,\s*32\s*\)")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).as_posix() == "core/config.py":
            continue
        source = path.read_text()
        tree = ast.parse(source)
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.Constant)) and id(node) not in docs:
                text = repr(node.value) if isinstance(node, ast.Constant) else ast.get_source_segment(source, node) or ""
                if pattern.search(text) and not (isinstance(node, ast.Constant) and isinstance(node.value, str)
                                                 and "\n" in node.value):
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {text[:60]}")
    return found


def test_the_image_shape_is_known_in_one_place():
    """CIFAR-10's (3, 32, 32) lives in core/config.py only; the schema's byte check agrees with it."""
    from cnnsql.core.config import CIFAR10_IMAGE_BYTES, CIFAR10_SHAPE

    assert shape_literals() == []
    assert CIFAR10_IMAGE_BYTES == CIFAR10_SHAPE[0] * CIFAR10_SHAPE[1] * CIFAR10_SHAPE[2]
    schema = (PACKAGE / "sql" / "schema.sql") if (PACKAGE / "sql").is_dir() else PACKAGE.parent / "sql" / "schema.sql"
    checks = [int(n) for n in __import__("re").findall(r"octet_length\(img\)\s*=\s*(\d+)", schema.read_text())]
    assert checks and set(checks) == {CIFAR10_IMAGE_BYTES}


def test_sql_files_are_package_data():
    """The package reads its SQL from inside itself (so a non-editable install works): cnnsql/sql is the
    top-level sql/ folder a psql user reads, and pyproject.toml ships its files."""
    import tomllib

    from cnnsql.core import config

    assert config.SQL_DIR == PACKAGE / "sql" and (PACKAGE / "sql").resolve() == (PACKAGE.parent / "sql").resolve()
    assert (config.SQL_DIR / "schema.sql").is_file() and (config.SQL_DIR / "queries" / "offline.sql").is_file()
    data = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert {"sql/*.sql", "sql/queries/*.sql"} <= set(data["cnnsql"])


if __name__ == "__main__":
    mods, edges = graph()
    largest = max(mods.items(), key=lambda kv: len(kv[1].read_text().splitlines()))
    print(f"modules {len(mods)}, layers {len(LAYERS)}, imports {sum(len(v) for v in edges.values())}, "
          f"cycles {len(cycles(edges))}, imports pointing up {len(upward(edges))}; largest module {largest[0]} "
          f"({len(largest[1].read_text().splitlines())} lines); image-shape literals outside core/config.py "
          f"{len(shape_literals())}")
    for src, dst in upward(edges):
        print(f"  up: {src} -> {dst}")
    for c in cycles(edges):
        print("  cycle:", " -> ".join(c))
