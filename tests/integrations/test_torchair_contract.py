"""The TorchAir adapter held to TorchAir's real source, read from the torch-npu 2.13.0 wheel.

torch_npu is never installed (without CANN it breaks ``import torch``). TorchAir's
plain-Python modules (its configs, its pattern pass manager) are loaded from the
unpacked wheel under stub parent packages, for the duration of one test, and
``sys.modules`` is restored afterwards. What is checked:

- every attribute and value the adapter sets is accepted by TorchAir's own
  ``CompilerConfig`` validation (``NpuBaseConfig.__setattr__``, ``OptionValue``), per mode;
- every ``pkg.<name>(...)`` call in the adapter binds to the signature of the function
  the wheel exports under that name (AST of the wheel's source), and the checker
  catches a wrong name or keyword;
- our fusions go through TorchAir's real ``register_replacement`` and its pattern pass
  rewrites a graph with them;
- ``codegen="torchair"`` through ``torch.compile`` with a stub TorchAir whose
  ``CompilerConfig`` is the real one: the post-pass graph, the config and the
  parameter marking reach TorchAir's compiler; without torch_npu, a typed error.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ascend_graph import AscendConfig, UnsupportedError
from ascend_graph.backend import ascend_backend
from ascend_graph.integrations import torchair as adapter
from ascend_graph.passes.manager import fusion_passes
from ascend_graph.passes.pattern import Fusion, PatternPass
from tests.npu_wheel import unpacked

ROOTS = ("torch_npu", "torchair", "npugraph_ex")
PACKAGES = ("torchair", "npugraph_ex")
MODES = ("max-autotune", "reduce-overhead", "npugraph_ex")


def dynamo_dir() -> Path:
    return unpacked() / "torch_npu" / "dynamo"


def _package(name: str, path: Path | None = None, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    if path is not None:
        module.__path__ = [str(path)]
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


@contextlib.contextmanager
def wheel_packages(torch_npu: bool = False):
    """``torchair`` and ``npugraph_ex`` as stub packages over the wheel's directories.

    Their ``__init__`` (and ``_utils/__init__``) are not run: those import the compiled
    parts. Submodules load from the wheel's files. With ``torch_npu``, a stub torch_npu
    is importable too. Everything under these roots is restored on exit.
    """
    base = dynamo_dir()
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in ROOTS}
    try:
        for name in PACKAGES:
            sys.modules[name] = _package(name, base / name)
            sys.modules[f"{name}._utils"] = _package(f"{name}._utils", base / name / "_utils")
        if torch_npu:
            sys.modules["torch_npu"] = _package("torch_npu", __version__="2.13.0 (stub)")
        yield importlib.import_module
    finally:
        for key in [k for k in sys.modules if k.split(".")[0] in ROOTS]:
            del sys.modules[key]
        sys.modules.update(saved)


def compiler_config_class(load, package: str):
    return load(f"{package}.configs.compiler_config").CompilerConfig


def _read_back(compiler_config, dotted: str):
    *parents, leaf = dotted.split(".")
    target = compiler_config
    for part in parents:
        target = getattr(target, part)
    return getattr(target, leaf)._value


# -- 1. the CompilerConfig we build is accepted by TorchAir's own validation -------------


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_compiler_config_accepted_by_torchair(mode, debug):
    config = AscendConfig(codegen="torchair", torchair_mode=mode, debug=debug, max_graphs=48)
    settings = adapter.compiler_settings(config)
    package = adapter.package_for(mode)
    with wheel_packages() as load:
        built = adapter.apply_settings(compiler_config_class(load, package)(), settings)
        for dotted, value in settings.items():
            assert _read_back(built, dotted) == value, dotted
        assert built.mode.value == mode
        assert _read_back(built, "frozen_parameter" if package == "npugraph_ex" else "experimental_config.frozen_parameter") is (not debug)
        assert built.post_grad_custom_pre_pass.value is None and built.post_grad_custom_post_pass.value is None
        local, _ = built.as_dict()  # how the GE / ACL graph read their options
        frozen = ("0" if debug else "1") if package == "torchair" else (not debug)  # torchair stringifies
        assert local["frozen_parameter"] == frozen
        if mode == "npugraph_ex":
            # the same config TorchAir builds from torch.compile(backend="npugraph_ex", options=...)
            theirs = compiler_config_class(load, package)()
            load("npugraph_ex.configs.compiler_config")._process_kwargs_options(theirs, {"options": settings})
            assert theirs.as_dict() == built.as_dict()
            assert local["capture_limit"] == "48"
        else:
            if mode == "reduce-overhead":
                assert built.debug.as_dict(mode)[0]["static_capture_size_limit"] == "48"
            # TorchAir's support check warns about nothing beyond what its own default
            # config of this mode warns about (reduce-overhead flags a default value)
            default = compiler_config_class(load, package)()
            default.mode = mode
            assert _support_warnings(load, built) == _support_warnings(load, default)


def _support_warnings(load, compiler_config) -> set[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load("torchair.configs.compiler_config")._check_config_support(compiler_config)
    return {str(w.message) for w in caught}


@pytest.mark.parametrize(
    "package, settings",
    [
        ("torchair", {"experimental_config.frozen_paramter": True}),  # misspelt attribute
        ("torchair", {"mode": "max_autotune"}),  # value outside the option list
        ("torchair", {"debug.aclgraph.static_capture_size_limit": 0}),  # out of range
        ("npugraph_ex", {"capture_limt": 8}),
        ("npugraph_ex", {"mode": "reduce-overhead"}),  # npugraph_ex has one mode
    ],
)
def test_torchair_validation_rejects_wrong_settings(package, settings):
    with wheel_packages() as load:
        with pytest.raises(ValueError):
            adapter.apply_settings(compiler_config_class(load, package)(), settings)


# -- 2. the names the adapter calls exist in the wheel with those signatures -------------


@dataclass(frozen=True)
class Call:
    name: str
    positional: int
    keywords: tuple[str, ...] = ()


def adapter_calls() -> list[Call]:
    """Every ``pkg.<name>(...)`` call in the adapter (``pkg`` is the loaded TorchAir package)."""
    tree = ast.parse(inspect.getsource(adapter))
    calls = []
    for node in ast.walk(tree):
        func = getattr(node, "func", None)
        if isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "pkg":
            calls.append(Call(func.attr, len(node.args), tuple(k.arg for k in node.keywords)))
    return calls


def _signature(args: ast.arguments, drop_first: bool) -> inspect.Signature:
    P = inspect.Parameter
    positional = [*args.posonlyargs, *args.args]
    defaults = [P.empty] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = [P(a.arg, P.POSITIONAL_ONLY if i < len(args.posonlyargs) else P.POSITIONAL_OR_KEYWORD, default=d) for i, (a, d) in enumerate(zip(positional, defaults))]
    if drop_first:
        params = params[1:]
    if args.vararg:
        params.append(P(args.vararg.arg, P.VAR_POSITIONAL))
    params += [P(a.arg, P.KEYWORD_ONLY, default=P.empty if d is None else d) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        params.append(P(args.kwarg.arg, P.VAR_KEYWORD))
    return inspect.Signature(params)


def _definition(path: Path, name: str):
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return node
    raise LookupError(f"{name} is not defined in {path}")


def wheel_signature(package: str, name: str) -> inspect.Signature:
    """Signature of ``package.name`` as the wheel's ``__init__`` exports it (AST only)."""
    base = dynamo_dir() / package
    init = ast.parse((base / "__init__.py").read_text())
    exported = next(ast.literal_eval(n.value) for n in init.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "__all__")
    if name not in exported:
        raise LookupError(f"{package}.{name} is not exported (its __all__: {exported})")
    module = next(n.module for n in init.body if isinstance(n, ast.ImportFrom) and any(a.name == name for a in n.names))
    node = _definition(base / (module.split(".", 1)[1].replace(".", "/") + ".py"), name)
    if isinstance(node, ast.ClassDef):
        init_def = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
        return _signature(init_def.args, drop_first=True)
    return _signature(node.args, drop_first=False)


def check_calls(calls, package: str) -> list[str]:
    """Problems with ``calls`` against ``package`` in the wheel; empty when all bind."""
    problems = []
    for call in calls:
        try:
            sig = wheel_signature(package, call.name)
        except LookupError as e:
            problems.append(str(e))
            continue
        try:
            sig.bind(*range(call.positional), **{k: None for k in call.keywords})
        except TypeError as e:
            problems.append(f"{package}.{call.name}({call.positional} positional, keywords {call.keywords}): {e}")
    return problems


#: What docs/torchair.md tells users to call.
DOCUMENTED = [Call("get_npu_backend", 0, ("compiler_config",)), Call("CompilerConfig", 0)]


@pytest.mark.parametrize("package", PACKAGES)
def test_adapter_calls_match_wheel_signatures(package):
    calls = adapter_calls()
    assert {c.name for c in calls} >= {"CompilerConfig", "get_compiler", "register_replacement"}
    register = next(c for c in calls if c.name == "register_replacement")
    assert {"trace_fn", "extra_check", "scalar_workaround", "skip_duplicates"} <= set(register.keywords)
    assert check_calls(calls + DOCUMENTED, package) == []


def test_call_checker_catches_wrong_names_and_keywords():
    problems = check_calls(
        [
            Call("get_compilr", 1),  # no such export
            Call("register_replacement", 3, ("exclusive_arg_names",)),  # inductor's keyword, not TorchAir's
            Call("get_npu_backend", 1),  # keyword-only in TorchAir
            Call("get_compiler", 2),  # one parameter
        ],
        "torchair",
    )
    assert len(problems) == 4, problems
    assert "get_compilr is not exported" in problems[0]
    assert "exclusive_arg_names" in problems[1]


@pytest.mark.parametrize("package", PACKAGES)
def test_compiler_object_and_pass_hooks_match_wheel(package):
    src = dynamo_dir() / package / "npu_fx_compiler.py"
    # get_compiler returns _NpuFxCompiler; we call it as compiler(gm, example_inputs)
    cls = _definition(src, "_NpuFxCompiler")
    call = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__call__")
    _signature(call.args, drop_first=True).bind("gm", ["inputs"])
    # the pre pass runs before view -> reshape, the post pass after it (why we use the pre pass)
    optimize = ast.get_source_segment(src.read_text(), _definition(src, "_optimize_fx"))
    order = [optimize.index(s) for s in ("post_grad_custom_pre_pass", "_view_to_reshape", "post_grad_custom_post_pass")]
    assert order == sorted(order)
    observer = (dynamo_dir() / package / "_utils" / "graph_transform_observer.py").read_text()
    assert "pass_fn(self.gm, self.example_inputs, self.config)" in observer
    # the marker _mark_static_inputs sets is the one the ACL graph reads
    assert '"_torchair_is_parameter"' in (dynamo_dir() / package / "_acl_concrete_graph" / "fx2acl_converter.py").read_text()


def test_torchair_pass_is_a_valid_custom_pass():
    hook = adapter.torchair_pass(AscendConfig(fusions=()))
    with wheel_packages() as load:
        cfg = compiler_config_class(load, "torchair")()
        cfg.post_grad_custom_pre_pass = hook  # CallableValue accepts it
    gm = torch.fx.symbolic_trace(_Clone())
    hook(gm, [torch.randn(3)], cfg)  # TorchAir's call: pass_fn(gm, example_inputs, config)
    assert "clone" not in gm.code


class _Clone(torch.nn.Module):
    def forward(self, x):
        return torch.ops.aten.clone.default(x) * 2


# -- 3. our fusions through TorchAir's real register_replacement and pattern pass --------


def _toy_pattern(x, y):
    return torch.add(x, y)


def _toy_replacement(x, y):
    return torch.sub(x, torch.neg(y))


def _toy_inputs():
    return [torch.randn(4, 3), torch.randn(4, 3)]


TOY = Fusion("toy_add", _toy_pattern, _toy_replacement, _toy_inputs, exclusive_arg_names=("x", "y"))


def _aten_graph(fn, *inputs) -> torch.fx.GraphModule:
    """An ATen graph whose meta values share one fake mode, as an AOT-traced graph's do."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, select_decomp_table(), tracing_mode="fake")(*inputs)


@pytest.mark.parametrize("package", PACKAGES)
def test_fusion_rows_run_through_torchair_pattern_pass(package):
    with wheel_packages() as load:
        manager = load(f"{package}.patterns.pattern_pass_manager")
        pkg = types.SimpleNamespace(register_replacement=manager.register_replacement)
        assert adapter.register_fusions([TOY], pkg) == 1
        assert adapter.register_fusions([TOY], pkg) == 1  # idempotent: skip_duplicates
        pass_dict = manager._pattern_manager().pass_dict

        a, b = torch.randn(5, 2), torch.randn(5, 2)
        gm = _aten_graph(lambda a, b: torch.add(a, b).relu(), a, b)
        assert pass_dict.apply(gm.graph) == 1
        gm.recompile()
        assert "aten.sub" in gm.code and "aten.add" not in gm.code
        torch.testing.assert_close(gm(a, b), torch.add(a, b).relu())

        # exclusive_arg_names, which TorchAir's register_replacement lacks, still holds
        same = _aten_graph(lambda a: torch.add(a, a).relu(), a)
        assert pass_dict.apply(same.graph) == 0


def test_exclusive_check_is_what_rejects_repeated_args():
    # control for the test above: the same row without exclusive_arg_names matches add(a, a)
    with wheel_packages() as load:
        manager = load("torchair.patterns.pattern_pass_manager")
        row = dataclasses.replace(TOY, exclusive_arg_names=())
        adapter.register_fusions([row], types.SimpleNamespace(register_replacement=manager.register_replacement))
        same = _aten_graph(lambda a: torch.add(a, a).relu(), torch.randn(5, 2))
        assert manager._pattern_manager().pass_dict.apply(same.graph) == 1


def test_register_patterns_fills_both_pattern_passes():
    # every row of every family pass, MoE's router table (a PatternPass it holds) included
    expected = 0
    for p in fusion_passes(AscendConfig()):
        expected += len(getattr(p, "fusions", ()))
        expected += sum(len(v.fusions) for v in vars(p).values() if isinstance(v, PatternPass))
    assert expected > 0
    with wheel_packages(torch_npu=True) as load:
        for name in PACKAGES:
            manager = load(f"{name}.patterns.pattern_pass_manager")
            sys.modules[name].register_replacement = manager.register_replacement
        assert adapter.register_patterns() == {"torchair": expected, "npugraph_ex": expected}


def test_register_patterns_without_npugraph_ex_fills_torchair_only():
    with wheel_packages(torch_npu=True) as load:
        sys.modules["torchair"].register_replacement = load("torchair.patterns.pattern_pass_manager").register_replacement
        sys.modules["npugraph_ex"] = None  # import fails
        assert set(adapter.register_patterns(AscendConfig(fusions=()))) == {"torchair"}
        with pytest.raises(UnsupportedError, match="npugraph_ex"):
            adapter.register_patterns(AscendConfig(fusions=()), packages=("npugraph_ex",))


# -- 4. codegen="torchair" through torch.compile -----------------------------------------


class RecordingCompiler:
    """Stands in for TorchAir's _NpuFxCompiler: records what it is given, runs the graph eagerly."""

    def __init__(self, compiler_config, seen):
        self.compiler_config = compiler_config
        self.seen = seen

    def __call__(self, gm, example_inputs):
        self.seen.append((self.compiler_config, gm, example_inputs))
        return lambda *args: gm(*args)


class Attn(torch.nn.Module):
    """Causal SDPA over a fused qkv projection: the attention family fuses it."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 16).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, 32)


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_hands_fused_graph_to_torchair(mode):
    torch._dynamo.reset()
    package = adapter.package_for(mode)
    seen: list = []
    model, x = Attn().eval(), torch.randn(3, 5, 32)
    with wheel_packages(torch_npu=True) as load:
        sys.modules[package].CompilerConfig = compiler_config_class(load, package)
        sys.modules[package].get_compiler = lambda cfg: RecordingCompiler(cfg, seen)
        compiled = torch.compile(model, backend=ascend_backend, options={"codegen": "torchair", "torchair_mode": mode})
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert len(seen) == 1
    cfg, gm, inputs = seen[0]
    assert cfg.mode.value == mode and cfg.post_grad_custom_pre_pass.value is None  # our passes already ran
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.ascend_graph.attention.default in targets  # TorchAir is handed our fused op
    assert not any("scaled_dot_product" in str(t) for t in targets)
    assert all(isinstance(t, torch._ops.OpOverload) for t in targets)  # functional ATen + our ops
    marked = [i for i, t in enumerate(inputs) if getattr(t, "_torchair_is_parameter", False)]
    params = [i for i, t in enumerate(inputs) if tuple(t.shape) in {(96, 32), (96,)}]
    assert len(params) == 2 and marked == ([] if mode == "max-autotune" else params)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 5)

    def forward(self, x):
        return torch.nn.functional.silu(self.proj(x)) * 2


def _torch_npu_absent() -> bool:
    return importlib.util.find_spec("torch_npu") is None


@pytest.mark.skipif(not _torch_npu_absent(), reason="torch_npu is installed here")
@pytest.mark.parametrize("mode", MODES)
def test_torchair_codegen_without_torch_npu_is_a_typed_error(mode):
    torch._dynamo.reset()
    compiled = torch.compile(Tiny(), backend=ascend_backend, options={"codegen": "torchair", "torchair_mode": mode})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        compiled(torch.randn(3, 6))
    inner = info.value.inner_exception
    assert isinstance(inner, UnsupportedError)
    assert "torch_npu" in inner.what and adapter.package_for(mode) in inner.what
    assert "ModuleNotFoundError" in inner.got and "codegen='auto'" in inner.hint


def test_missing_npugraph_ex_names_the_package():
    with wheel_packages(torch_npu=True):
        sys.modules["npugraph_ex"] = None
        with pytest.raises(UnsupportedError, match="no usable 'npugraph_ex'") as info:
            adapter.load_package("npugraph_ex")
    assert "reduce-overhead" in info.value.hint
