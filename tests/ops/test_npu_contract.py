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
