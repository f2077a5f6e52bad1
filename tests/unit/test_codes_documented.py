"""Every stable code in src/freezeframe is in README's table of error and outcome codes, so the
table cannot go stale: the ``code=`` arguments of calls (literals, both sides of a conditional,
module constants such as ``OVERLAY_DIR_UNREACHABLE``), ``default_code`` class attributes and
the defaults of parameters named ``code``."""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import freezeframe

SRC = Path(freezeframe.__file__).parent
README = SRC.parents[1] / "README.md"


def _strings(node: ast.expr | None, consts: dict[str, str]) -> Iterator[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, ast.Name) and node.id in consts:
        yield consts[node.id]
    elif isinstance(node, ast.IfExp):
        yield from _strings(node.body, consts)
        yield from _strings(node.orelse, consts)


def _module_constants(trees: dict[Path, ast.Module]) -> dict[str, str]:
    consts: dict[str, str] = {}
    for tree in trees.values():
        for stmt in tree.body:
            value: ast.expr | None
            if isinstance(stmt, ast.Assign):
                targets, value = stmt.targets, stmt.value
            elif isinstance(stmt, ast.AnnAssign):
                targets, value = [stmt.target], stmt.value
            else:
                continue
            if not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
                continue
            for t in targets:
                if isinstance(t, ast.Name) and t.id.isupper():
                    consts[t.id] = value.value
    return consts


def source_codes() -> dict[str, set[str]]:
    """Each code found in the source -> where (file:line)."""
    trees = {p: ast.parse(p.read_text(), str(p)) for p in SRC.rglob("*.py")}
    consts = _module_constants(trees)
    found: defaultdict[str, set[str]] = defaultdict(set)
    for path, tree in trees.items():
        rel = path.relative_to(SRC)
        for node in ast.walk(tree):
            values: list[str] = []
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "code":
                        values += _strings(kw.value, consts)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "default_code" for t in targets):
                    values += _strings(node.value, consts)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                positional = args.posonlyargs + args.args
                with_default = positional[len(positional) - len(args.defaults) :]
                pairs = list(zip(with_default, args.defaults, strict=True))
                pairs += [
                    (a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d
                ]
                values += [v for a, d in pairs if a.arg == "code" for v in _strings(d, consts)]
            for v in values:
                found[v].add(f"{rel}:{getattr(node, 'lineno', '?')}")
    return dict(found)


def readme_table() -> str:
    text = README.read_text()
    return text.split("### Error and outcome codes", 1)[1].split("\n## ", 1)[0]


def test_the_collector_finds_codes_of_every_kind() -> None:
    codes = source_codes()
    # a class default, a keyword literal, a module constant, a conditional, a parameter default
    for code in ("vm-busy", "bad-database-url", "overlay-dir-unreachable", "no-space"):
        assert code in codes, code
    assert "metadata-write-failed" in codes
    assert "tool-failed" in codes
    assert len(codes) > 60


def test_every_code_in_the_source_is_in_readmes_table() -> None:
    table = readme_table()
    missing = {c: sorted(w) for c, w in source_codes().items() if f"`{c}`" not in table}
    assert not missing, f"codes missing from README's table: {missing}"
