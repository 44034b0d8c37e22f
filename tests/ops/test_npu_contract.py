"""The NPU bindings against torch-npu 2.13.0's real API, without an NPU or torch_npu installed.

For every module of ``ascend_graph/ops/kernels/npu/`` (found by listing the package, so
families added later are picked up):

1. AST scan: every ``torch_npu.<op>(...)`` call names an op declared in
   ``CustomFunctions.h``; its positional arguments are only the op's leading required
   tensors; every keyword is a parameter name of one declaration of that op.
2. ``META_CHECKS``: each row's call, run through the op's meta function from
   ``op_plugin/meta/_meta_registrations.py`` (executed from source with its torch_npu
   imports stubbed), gives the output shapes our fake impl gives (compared against the
   first ``len(expected)`` outputs: FIA also returns an lse we do not use).

The checker is also run on deliberately wrong calls, so it cannot pass vacuously.
"""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import re
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests import npu_wheel

import ascend_graph.ops.kernels.npu as npu_pkg

# --------------------------------------------------------------------------- header


@dataclass(frozen=True)
class Decl:
    name: str
    params: tuple[str, ...]
    leading_tensors: int  # leading required (non-optional) Tensor parameters


_DECL = re.compile(r"TORCH_NPU_API\s+(?P<ret>.+?)\s+(?P<name>\w+)\((?P<params>.*)\);\s*$")


def _split_top(params: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in params:
        if ch in "<([{":
            depth += 1
        elif ch in ">)]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur))
    return out


def parse_header(text: str) -> dict[str, list[Decl]]:
    decls: dict[str, list[Decl]] = {}
    for line in text.splitlines():
        m = _DECL.match(line.strip())
        if not m:
            continue
        names, leading, still_leading = [], 0, True
        for p in _split_top(m["params"]):
            p = p.split("=", 1)[0].strip()
            typ, _, pname = p.rpartition(" ")
            names.append(pname.strip("&* "))
            # leading required tensors or tensor lists (npu_grouped_matmul takes lists)
            is_tensor = "Tensor" in typ and "optional" not in typ
            if still_leading and is_tensor:
                leading += 1
            else:
                still_leading = False
        decls.setdefault(m["name"], []).append(Decl(m["name"], tuple(names), leading))
    return decls


@pytest.fixture(scope="module")
def header() -> dict[str, list[Decl]]:
    return parse_header(npu_wheel.custom_functions_header())


# --------------------------------------------------------------------------- AST scan


def torch_npu_calls(source: str) -> list[tuple[int, str, int, list[str], bool]]:
    """(line, op, positional count, keywords, uses */**) of each ``torch_npu.X(...)`` call."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            base = node.func.value
            if isinstance(base, ast.Name) and base.id == "torch_npu":
                starred = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
                out.append((node.lineno, node.func.attr, len(node.args), [k.arg for k in node.keywords if k.arg], starred))
    return out


def contract_errors(source: str, header: dict[str, list[Decl]]) -> list[str]:
    errors = []
    for line, op, npos, keywords, starred in torch_npu_calls(source):
        if starred:
            errors.append(f"line {line}: torch_npu.{op} called with *args/**kwargs; names cannot be checked")
            continue
        decls = header.get(op)
        if not decls:
            errors.append(f"line {line}: torch_npu.{op} is not declared in CustomFunctions.h")
            continue
        problems = []
        for decl in decls:
            bad = [k for k in keywords if k not in decl.params]
            if npos > decl.leading_tensors:
                problems.append(f"{npos} positional arguments, only {decl.leading_tensors} leading tensors allowed")
            elif bad:
                problems.append(f"unknown keyword(s) {bad}")
            else:
                break
        else:
            errors.append(f"line {line}: torch_npu.{op}: " + "; ".join(problems))
    return errors


def binding_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(npu_pkg.__path__) if not m.name.startswith("_"))


def test_bindings_found():
    assert "attention" in binding_modules()


@pytest.mark.parametrize("family", binding_modules())
def test_ops_and_keywords_declared(family, header):
    module = importlib.import_module(f"{npu_pkg.__name__}.{family}")
    source = Path(module.__file__).read_text()
    calls = torch_npu_calls(source)
    assert calls, f"{family}: no torch_npu.<op>(...) call found"
    assert contract_errors(source, header) == []
    assert callable(module.register)


def test_checker_rejects_wrong_calls(header):
    good = "def f(q, k, v):\n    torch_npu.npu_fused_infer_attention_score_v2(q, k, v, num_query_heads=8, softmax_scale=0.1)\n"
    assert contract_errors(good, header) == []
    wrong_name = good.replace("npu_fused_infer_attention_score_v2", "npu_fused_infer_attention_score_v3")
    assert "not declared" in contract_errors(wrong_name, header)[0]
    # ``num_heads`` is v1's spelling: wrong for _v2
    wrong_kw = good.replace("num_query_heads", "num_heads")
    assert "unknown keyword(s) ['num_heads']" in contract_errors(wrong_kw, header)[0]
    too_positional = good.replace("(q, k, v,", "(q, k, v, None,")
    assert "positional" in contract_errors(too_positional, header)[0]
    starred = good.replace("(q, k, v,", "(*qkv,")
    assert "*args" in contract_errors(starred, header)[0]


# --------------------------------------------------------------------------- meta functions


class _StubModule(types.ModuleType):
    """torch_npu stand-in for the meta source: any attribute is a unique sentinel."""

    def __getattr__(self, name):
        value = object()
        setattr(self, name, value)
        return value


def load_meta_functions(source: str) -> dict[str, object]:
    """Execute ``_meta_registrations.py`` with its imports stubbed; returns {op: meta fn}."""
    registry: dict[str, object] = {}

    class Library:
        def __init__(self, ns, kind, key):
            self.ns = ns

    def impl(lib, name):
        def deco(fn):
            if lib.ns == "npu":
                registry[name] = fn
            return fn

        return deco

    class ErrCode:
        def __getattr__(self, name):
            return name

    tree = ast.parse(source)
    # imports are replaced by the stubs below; bare top-level calls (has_side_effect on
    # torch.ops.npu.*) need the real ops and do not define meta functions
    tree.body = [n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom, ast.Expr))]
    import math
    import os
    import warnings

    env = {
        "__name__": "torch_npu_meta_registrations",
        "math": math,
        "os": os,
        "warnings": warnings,
        "torch": torch,
        "torch_npu": _StubModule("torch_npu"),
        "Library": Library,
        "impl": impl,
        "has_side_effect": lambda *a: None,
        "ErrCode": ErrCode(),
        "ops_error": lambda *a: "",
        "get_cann_version": lambda: "8.5.0",
        "get_soc_version": lambda: 0,
    }
    exec(compile(tree, "_meta_registrations.py", "exec"), env)
    return registry


@pytest.fixture(scope="module")
def meta_functions() -> dict[str, object]:
    return load_meta_functions(npu_wheel.meta_registrations_source())


def _to_meta(x):
    if isinstance(x, torch.Tensor):
        return x.to("meta")
    if isinstance(x, (list, tuple)):
        return type(x)(_to_meta(y) for y in x)
    return x


def _shapes(out) -> list[tuple[int, ...]]:
    if out is None:
        return []
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [tuple(o.shape) for o in outs]


def meta_rows():
    rows = []
    for family in binding_modules():
        module = importlib.import_module(f"{npu_pkg.__name__}.{family}")
        for i, (op, build) in enumerate(getattr(module, "META_CHECKS", [])):
            rows.append(pytest.param(family, op, build, id=f"{family}-{i}-{op}"))
    return rows


@pytest.mark.parametrize("family,op,build", meta_rows())
def test_meta_shapes_match_fake_impl(family, op, build, meta_functions, header):
    assert op in header, f"{op} is not declared in CustomFunctions.h"
    assert op in meta_functions, f"no meta function for {op} in _meta_registrations.py"
    expected, args, kwargs = build()
    got = _shapes(meta_functions[op](*_to_meta(args), **_to_meta(kwargs)))
    assert got[: len(expected)] == [tuple(s) for s in expected], f"{family}: {op} meta gives {got}, our fake impl {expected}"


def test_meta_check_catches_a_wrong_shape(meta_functions):
    """The comparison is live: FIA told ``num_query_heads`` wrong (BSH) gives another shape."""
    q = torch.empty(2, 7, 16 * 64, device="meta", dtype=torch.bfloat16)
    kv = torch.empty(2, 7, 4 * 64, device="meta", dtype=torch.bfloat16)
    fia = meta_functions["npu_fused_infer_attention_score_v2"]
    right = _shapes(fia(q, kv, kv, num_query_heads=16, num_key_value_heads=4, input_layout="BSH"))[0]
    wrong = _shapes(fia(q, kv, kv, num_query_heads=16, num_key_value_heads=8, input_layout="BSH"))[0]
    assert right == (2, 7, 1024)
    assert wrong != right


# --------------------------------------------------------------------------- graph task groups
#
# The captured-graph path (``runtime/npu_updates.py``, ``runtime/graphs.py`` and the
# bindings' ``.out`` calls) uses names CustomFunctions.h does not declare: op overloads
# (``torch_npu.<op>.out``, whose Python keywords ``workspace`` / ``out`` differ from the
# C++ names) and the ``torch_npu.npu`` graph API. They are checked against the wheel
# itself: the operator schemas registered in ``torch_npu/lib/libtorch_npu.so`` and the
# Python sources of ``torch_npu/npu/``.

import zipfile

GRAPH_MODULES = ("ascend_graph.runtime.npu_updates", "ascend_graph.runtime.graphs")


def _wheel() -> zipfile.ZipFile:
    return zipfile.ZipFile(npu_wheel.wheel())  # downloaded once; skips (fails in CI) without it


@pytest.fixture(scope="module")
def wheel_python() -> dict[str, str]:
    """The wheel's ``torch_npu/npu/*.py`` sources, by file name."""
    with _wheel() as z:
        return {
            n.rsplit("/", 1)[1]: z.read(n).decode()
            for n in z.namelist()
            if n.startswith("torch_npu/npu/") and n.count("/") == 2 and n.endswith(".py")
        }


_SCHEMA = re.compile(rb"(_?npu_\w+(?:\.\w+)?\([^\x00\n]*?\) -> [^\x00\n]+)")


@pytest.fixture(scope="module")
def op_schemas() -> dict[str, str]:
    """``name[.overload]`` -> schema string, as registered in ``libtorch_npu.so`` (cached)."""
    cached = npu_wheel.cache_root() / "libtorch_npu_schemas.txt"
    if not cached.exists():
        with _wheel() as z:
            blob = z.read("torch_npu/lib/libtorch_npu.so")
        # written aside and renamed: another test run may read it at the same time
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(sorted({m.decode() for m in _SCHEMA.findall(blob)})))
        os.replace(tmp, cached)
    return {line.split("(", 1)[0]: line for line in cached.read_text().splitlines()}


def schema_params(schema: str) -> tuple[list[str], list[str]]:
    """(positional names, keyword-only names) of a ``name(args) -> ret`` schema."""
    inner = schema[schema.index("(") + 1 : schema.rindex(") ->")]
    positional, keyword, kw_only = [], [], False
    for p in _split_top(inner):
        p = p.strip()
        if p == "*":
            kw_only = True
            continue
        name = p.split("=", 1)[0].split()[-1]
        (keyword if kw_only else positional).append(name)
    return positional, keyword


def _npu_exports(wheel_python: dict[str, str]) -> dict[str, str]:
    """``torch_npu.npu`` public name -> the file of ``torch_npu/npu/`` it is imported from."""
    tree = ast.parse(wheel_python["__init__.py"])
    exported: set[str] = set()
    origin: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            exported = {e.value for e in node.value.elts}
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for alias in node.names:
                origin[alias.asname or alias.name] = node.module.split(".")[0] + ".py"
    # ``from .memory import *``: the file that defines the name at top level
    defined: dict[str, str] = {}
    for file, src in sorted(wheel_python.items()):
        for n in ast.parse(src).body:
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
                defined.setdefault(n.name, file)
    return {name: origin.get(name) or defined.get(name, "__init__.py") for name in exported}


def _python_def(wheel_python: dict[str, str], file: str, name: str) -> ast.AST | None:
    for node in ast.parse(wheel_python[file]).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return node
    return None


def _callable_params(node: ast.AST) -> tuple[list[str], bool]:
    """(parameter names, takes **kwargs) of a def, or of a class's __init__/__new__."""
    if isinstance(node, ast.ClassDef):
        inits = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name in ("__init__", "__new__")]
        if not inits:
            return [], False
        # the richer of the two: torch_npu's Stream defines only __new__, graph only __init__
        node = max(inits, key=lambda f: len(f.args.args))
        args = node.args
        return [a.arg for a in args.args[1:] + args.kwonlyargs], args.kwarg is not None
    args = node.args
    return [a.arg for a in args.args + args.kwonlyargs], args.kwarg is not None


def _chain(node: ast.AST) -> list[str] | None:
    """``x.torch_npu.a.b`` / ``torch_npu.a.b`` -> ['a', 'b'], rooted at torch_npu; ``torch.npu.a`` -> ['npu', 'a']."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        if node.attr == "torch_npu":
            return list(reversed(parts[:-1]))
        node = node.value
    if isinstance(node, ast.Name) and node.id == "torch_npu":
        return list(reversed(parts))
    if isinstance(node, ast.Name) and node.id == "torch" and parts and parts[-1] == "npu":
        return list(reversed(parts))
    return None


def graph_api_uses(source: str) -> list[tuple[int, list[str], tuple[int, list[str], bool] | None]]:
    """(line, chain, (positional count, keywords, starred) if called) of every two-level
    ``torch_npu.<a>.<b>`` (or ``torch.npu.<b>``) reference."""
    tree = ast.parse(source)
    calls = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            starred = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
            calls[id(node.func)] = (len(node.args), [k.arg for k in node.keywords if k.arg], starred)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain = _chain(node)
            if chain is not None and len(chain) == 2:
                out.append((node.lineno, chain, calls.get(id(node))))
    return out


def graph_api_errors(source: str, exports: dict[str, str], wheel_python: dict[str, str], op_schemas: dict[str, str], header) -> list[str]:
    errors = []
    for line, (first, second), call in graph_api_uses(source):
        where = f"line {line}: torch_npu.{first}.{second}"
        if call is not None and call[2]:
            errors.append(f"{where} called with *args/**kwargs; names cannot be checked")
            continue
        if first == "npu":
            if second not in exports:
                errors.append(f"{where} is not exported by torch_npu/npu/__init__.py")
                continue
            if call is None:
                continue
            node = _python_def(wheel_python, exports[second], second)
            if node is None:
                errors.append(f"{where}: no def/class {second} in torch_npu/npu/{exports[second]}")
                continue
            params, takes_kwargs = _callable_params(node)
            if call[0] > len(params):
                errors.append(f"{where}: {call[0]} positional arguments, it takes {params}")
            bad = [k for k in call[1] if k not in params and not takes_kwargs]
            if bad:
                errors.append(f"{where}: unknown keyword(s) {bad}, it takes {params}")
        elif first == "_C":
            imported = any(f"from torch_npu._C import {second}" in src or re.search(rf"from torch_npu\._C import \([^)]*\b{second}\b", src) for src in wheel_python.values())
            if not imported:
                errors.append(f"{where}: torch_npu/npu/*.py never imports {second} from torch_npu._C")
        else:  # an op overload: torch_npu.<op>.<overload>(...)
            schema = op_schemas.get(f"{first}.{second}")
            if schema is None:
                errors.append(f"{where}: no schema {first}.{second} registered in libtorch_npu.so")
                continue
            if first not in header:
                errors.append(f"{where}: {first} is not declared in CustomFunctions.h")
            if call is None:
                continue
            positional, keyword = schema_params(schema)
            if call[0] > len(positional):
                errors.append(f"{where}: {call[0]} positional arguments, the schema has {len(positional)}")
            bad = [k for k in call[1] if k not in positional + keyword]
            if bad:
                errors.append(f"{where}: unknown keyword(s) {bad}")
    return errors


@pytest.fixture(scope="module")
def npu_exports(wheel_python) -> dict[str, str]:
    return _npu_exports(wheel_python)


@pytest.mark.parametrize("module_name", GRAPH_MODULES + tuple(f"{npu_pkg.__name__}.{f}" for f in binding_modules()))
def test_graph_api_uses_exist_in_wheel(module_name, npu_exports, wheel_python, op_schemas, header):
    source = Path(importlib.import_module(module_name).__file__).read_text()
    assert graph_api_errors(source, npu_exports, wheel_python, op_schemas, header) == []


def test_task_group_path_uses_every_checked_name(npu_exports, wheel_python, op_schemas, header):
    """The names the capture path needs are all seen by the scan above, and exist."""
    from ascend_graph.ops.kernels.npu import attention
    from ascend_graph.runtime import npu_updates

    used = set()
    for name in GRAPH_MODULES + (attention.__name__,):
        used |= {tuple(c) for _, c, _ in graph_api_uses(Path(importlib.import_module(name).__file__).read_text())}
    for fn in npu_updates.GRAPH_API:
        assert fn in npu_exports, fn
        assert ("npu", fn) in used, f"GRAPH_API lists {fn} but no code calls torch_npu.npu.{fn}"
    for dotted in attention._FIA_GRAPH_OPS:
        if "." in dotted:
            assert dotted in op_schemas, dotted
            assert tuple(dotted.split(".")) in used
        else:
            assert dotted in header, dotted
    # the .out overload's Python keywords: the C++ names are attention_out / softmax_lse
    positional, keyword = schema_params(op_schemas["npu_fused_infer_attention_score_v2.out"])
    assert positional == ["query", "key", "value"] and keyword[-2:] == ["workspace", "out"]
    assert ("_C", "_weak_ref_tensor") in used


def test_methods_used_on_npu_objects_exist(npu_exports, wheel_python):
    from ascend_graph.runtime import npu_updates

    for cls, methods in npu_updates.NPU_METHODS.items():
        node = _python_def(wheel_python, npu_exports[cls], cls)
        assert isinstance(node, ast.ClassDef), cls
        defined = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
        assert set(methods) <= defined, f"{cls} lacks {set(methods) - defined}"


def test_graph_checker_rejects_wrong_uses(npu_exports, wheel_python, op_schemas, header):
    good = (
        "def f(torch_npu, s, h, q, k, v, ws, o, l):\n"
        "    torch_npu.npu.graph_task_update_begin(s, h)\n"
        "    torch_npu.npu_fused_infer_attention_score_v2.out(q, k, v, actual_seq_qlen=[1], workspace=ws, out=[o, l])\n"
        "    torch_npu._C._weak_ref_tensor(q)\n"
    )
    check = lambda src: graph_api_errors(src, npu_exports, wheel_python, op_schemas, header)  # noqa: E731
    assert check(good) == []
    assert "not exported" in check(good.replace("graph_task_update_begin", "graph_task_update_start"))[0]
    assert "positional" in check(good.replace("(s, h)", "(s, h, q)"))[0]
    assert "unknown keyword(s) ['attention_out']" in check(good.replace("out=[o, l]", "attention_out=o"))[0]
    assert "no schema" in check(good.replace(".out(", ".inplace("))[0]
    assert "never imports" in check(good.replace("_weak_ref_tensor", "_strong_ref_tensor"))[0]


# --------------------------------------------------------------------------- norm / RoPE / SwiGLU ops
#
# The torch_npu ops behind ``ops/norm_rope.py`` (issue 20), with the parameter names
# the bindings rely on or will: read from torch-npu 2.13.0's CustomFunctions.h, and each
# has a meta function. ``npu_apply_rotary_pos_emb``, ``npu_interleave_rope`` and
# ``npu_qkv_rms_norm_rope_cache`` are not called yet (see kernels/npu/norm_rope.py: the
# rotary op is npu_rotary_mul, and the one-op chain's ND cache mode is undocumented);
# their names are pinned here so a binding written later is held to them.

NORM_ROPE_OPS = {
    "npu_rms_norm": ("self", "gamma", "epsilon"),
    "npu_gemma_rms_norm": ("self", "gamma", "epsilon"),
    "npu_add_rms_norm": ("x1", "x2", "gamma", "epsilon"),
    "npu_swiglu": ("self", "dim"),
    "npu_rotary_mul": ("self", "r1", "r2", "rotary_mode", "rotate"),
    "npu_apply_rotary_pos_emb": ("query", "key", "cos", "sin", "layout", "rotary_mode"),
    "npu_interleave_rope": ("x", "cos", "sin"),
    "npu_qkv_rms_norm_rope_cache": (
        "qkv", "q_gamma", "k_gamma", "cos", "sin", "index", "q_out", "k_cache", "v_cache", "qkv_size", "head_nums",
        "k_scale", "v_scale", "k_offset", "v_offset", "epsilon", "cache_mode", "is_output_qkv",
    ),
}


@pytest.mark.parametrize("op", sorted(NORM_ROPE_OPS))
def test_norm_rope_npu_ops_declared_with_their_names(op, header, meta_functions):
    assert op in header, f"{op} is not declared in CustomFunctions.h"
    assert any(d.params == NORM_ROPE_OPS[op] for d in header[op]), [d.params for d in header[op]]
    assert op in meta_functions, f"no meta function for {op}"


def test_norm_rope_qkv_chain_meta_shapes(meta_functions):
    """The one-op chain's outputs with is_output_qkv: q, k, v as [T, heads * D]."""
    T, nq, nk, D = 5, 8, 2, 128
    qkv = torch.empty(T, (nq + 2 * nk) * D, device="meta", dtype=torch.bfloat16)
    g = torch.empty(D, device="meta", dtype=torch.bfloat16)
    cs = torch.empty(T, D, device="meta", dtype=torch.bfloat16)
    out = meta_functions["npu_qkv_rms_norm_rope_cache"](
        qkv, g, g, cs, cs, torch.empty(T, device="meta", dtype=torch.int64), torch.empty(T, nq * D, device="meta", dtype=torch.bfloat16),
        torch.empty(4, 16, nk, D, device="meta", dtype=torch.bfloat16), torch.empty(4, 16, nk, D, device="meta", dtype=torch.bfloat16),
        [T, 1, nq + 2 * nk, D], [nq, nk, nk], is_output_qkv=True,
    )
    assert _shapes(out) == [(T, nq * D), (T, nk * D), (T, nk * D)]
