"""Graph-cache keys: what an entry depends on, as named factors.

Entry point: :func:`compute_key` on the Dynamo graph the backend receives. A key is a
mapping of named factors (``KEY_FACTORS``) and its digest; the digest names the entry's
directory. Keeping the factors (not only the digest) in every manifest is what lets a
miss say *which* factor changed (TorchAir's ``cache_compile`` keys on ``str(module)`` and
the config only, so a CANN or torch upgrade silently loads a stale artifact; see
reference/anchors.md 1.5).

Invariants:

- Every factor is a string; the digest is a pure function of the factors.
- Versions are read with :mod:`importlib.metadata`, never by importing the package:
  importing ``torch_npu`` without CANN breaks ``import torch`` (DESIGN.md "Hardware
  honesty").
- Nothing path-like enters the key (vLLM PR #47573: HOME paths in the hash caused
  needless recompiles), so a cache directory can be moved or shipped to another
  machine with the same software.
- The key must name everything the compiled graph depends on: a verified hit of an
  inductor entry *loads* the compiled graph (``aot.py``) instead of building it. Two
  keys guard that load: this one (passes, config, versions, device, graph) and
  AOTAutograd's own key of the Dynamo graph, the inputs and torch's configs, which
  carries this digest in its tag. Something a pass reads that is in neither (an
  environment variable, a library outside the factors) would be loaded stale: passes
  must not read such things (STYLE.md: the environment is read at the entry points).
  Hits that rebuild (FX codegen, an entry torch could not cache) still compare the
  post-pass graph with the stored one and report a mismatch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.fx

__all__ = [
    "KEY_FACTORS",
    "SERVING_OPTIONS",
    "config_factor",
    "graph_options",
    "serving_options",
    "ENVIRONMENT_FACTORS",
    "CacheKey",
    "compute_key",
    "environment_factors",
    "device_factor",
    "graph_factor",
    "graph_slot",
    "cann_version",
]

#: Every factor of a key, in the order reports list them.
KEY_FACTORS = ("package", "passes", "config", "graph", "torch", "triton", "torch_npu", "cann", "python", "device")

#: The factors that describe the machine and its software rather than the model:
#: an entry that differs from this machine in one of these is "stale" for ``verify``.
ENVIRONMENT_FACTORS = ("package", "torch", "triton", "torch_npu", "cann", "python", "device")

#: AscendConfig fields that steer capture and serving, not the compiled graph: they stay
#: out of the key (a server with another bucket list, warm-up, graphs on/off, output
#: cloning or budgets loads the same entries) and are recorded beside it in the manifest.
#: Every other field is in the key, a field added later included: leaving one out must be
#: a decision. ``max_graphs`` is in the key for torchair codegen (its capture limit is
#: compiled into the torchair graph), out of it otherwise.
SERVING_OPTIONS = (
    "buckets", "max_batch", "num_speculative_tokens", "max_graphs", "warmup", "pad_roles",
    "stream_budget", "memory_budget_bytes", "graphs", "clone_outputs",
    "cache_dir", "cache_strict", "dump_dir", "debug", "explain_node",
)

#: Where CANN's toolkit lives when ``ASCEND_TOOLKIT_HOME`` is not set (its installer's default).
_DEFAULT_CANN_HOME = "/usr/local/Ascend/ascend-toolkit/latest"

NOT_INSTALLED = "none"


@dataclass(frozen=True)
class CacheKey:
    """Named factors and the digest that names the entry directory."""

    factors: Mapping[str, str]
    #: identity of "this graph" across changes of its code: the names of its
    #: non-parameter inputs. Entries with the same slot are the candidates a miss is
    #: explained against (a new graph of a model with graph breaks has another slot).
    slot: str

    @property
    def digest(self) -> str:
        blob = json.dumps(dict(self.factors), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def diff(self, other: Mapping[str, str]) -> dict[str, tuple[str | None, str | None]]:
        """Factors whose values differ: name -> (this key's value, ``other``'s value)."""
        names = [n for n in KEY_FACTORS if n in self.factors or n in other]
        names += sorted((set(self.factors) | set(other)) - set(names))
        return {n: (self.factors.get(n), other.get(n)) for n in names if self.factors.get(n) != other.get(n)}


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def cann_version(toolkit_home: str | None = None) -> str:
    """The CANN toolkit version from its install-info file, without importing anything.

    CANN writes ``version=8.x.y`` into ``<home>/<arch>-linux/ascend_toolkit_install.info``
    (older releases: ``<home>/version.cfg`` with ``toolkit_installed_version=[...]``).
    ``toolkit_home`` defaults to ``$ASCEND_TOOLKIT_HOME`` (set by CANN's ``set_env.sh``),
    then the installer's default path; this is the one place the cache reads the
    environment.
    """
    home = toolkit_home or os.environ.get("ASCEND_TOOLKIT_HOME") or _DEFAULT_CANN_HOME
    candidates = [os.path.join(home, f"{platform.machine()}-linux", "ascend_toolkit_install.info"), os.path.join(home, "version.cfg")]
    for path in candidates:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        for line in text.splitlines():
            name, _, value = line.partition("=")
            if name.strip() in ("version", "Version", "toolkit_installed_version"):
                return value.strip().strip("[]:").strip() or NOT_INSTALLED
    return NOT_INSTALLED


def device_factor(device: torch.device) -> str:
    """What the generated code depends on in the device: type, model, ISA / compute capability."""
    if device.type == "cpu":
        # Inductor's C++ kernels are built for the vector ISA it picks (AVX2, AVX512...).
        return f"cpu:{platform.machine()}:{torch.backends.cpu.get_cpu_capability()}"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{torch.cuda.get_device_name(index)}:sm{major}{minor}"
    if device.type == "npu":
        # torch.npu exists only once the user imported torch_npu (they have: the graph is on an NPU).
        npu = getattr(torch, "npu", None)
        name = npu.get_device_name(device.index or 0) if npu is not None and hasattr(npu, "get_device_name") else "unknown"
        return f"npu:{name}"
    return device.type


def environment_factors(device: torch.device) -> dict[str, str]:
    """The machine-and-software factors of a key, for graphs on ``device``."""
    from .._version import __version__

    return {
        "package": __version__,
        "torch": torch.__version__,
        "triton": _dist_version("triton"),
        "torch_npu": _dist_version("torch_npu"),
        "cann": cann_version(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "device": device_factor(device),
    }


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        dims = ",".join(str(s) for s in value.shape)
        return f"tensor[{dims}]:{value.dtype}:{value.device.type}:grad={value.requires_grad}"
    if isinstance(value, torch.SymInt):
        return f"symint:{value.node.expr}"
    return type(value).__name__


def graph_factor(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> str:
    """Hash of the Dynamo graph's code and of every input's shape, dtype and device kind.

    The code alone is not enough: two models that differ only in hidden size trace to
    the same code text.
    """
    h = hashlib.sha256(gm.code.encode())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        value = node.meta.get("example_value")
        if value is None and i < len(example_inputs):
            value = example_inputs[i]
        h.update(f"\n{node.name}={_describe_value(value)}".encode())
    return h.hexdigest()[:32]


def _serving(config: Any, codegen: str) -> tuple[str, ...]:
    return tuple(n for n in SERVING_OPTIONS if not (n == "max_graphs" and codegen == "torchair"))


def graph_options(config: Any, codegen: str) -> dict[str, Any]:
    """The config fields the compiled graph depends on (what the "config" factor hashes)."""
    serving = _serving(config, codegen)
    return {name: value for name, value in config.describe().items() if name not in serving}


def serving_options(config: Any, codegen: str) -> dict[str, Any]:
    """The config fields recorded beside the key (not in it): see ``SERVING_OPTIONS``."""
    serving = _serving(config, codegen)
    return {name: value for name, value in config.describe().items() if name in serving}


def config_factor(config: Any, codegen: str) -> str:
    """The "config" factor: hash of :func:`graph_options`, and the codegen resolved for the device."""
    blob = json.dumps(graph_options(config, codegen), sort_keys=True, default=repr)
    return f"{hashlib.sha256(blob.encode()).hexdigest()[:16]}:{codegen}"


def graph_slot(input_names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(input_names).encode()).hexdigest()[:16]


def compute_key(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], ctx: Any) -> CacheKey:
    """The key of one Dynamo graph compiled under ``ctx`` (a backend ``CompileContext``)."""
    factors = {
        "passes": ctx.pass_manager.uuid() if ctx.pass_manager is not None else NOT_INSTALLED,
        # codegen is resolved per device ("auto"), so it goes in beside the config hash.
        "config": config_factor(ctx.config, ctx.codegen),
        "graph": graph_factor(gm, example_inputs),
    }
    factors.update(environment_factors(ctx.device))
    ordered = {name: factors[name] for name in KEY_FACTORS}
    names = [v.name for v in ctx.shapes.inputs if v.kind != "param"]
    return CacheKey(factors=ordered, slot=graph_slot(names))
