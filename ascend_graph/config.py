"""AscendConfig: the one typed, frozen configuration of a compile.

``torch.compile(model, backend="ascend", options={...})`` turns ``options`` into an
``AscendConfig`` with :meth:`AscendConfig.from_options`; an unknown key, a value of the
wrong type (a bool where an int is meant included) or out of range, or an
``inductor_config`` key inductor does not have, is a
:class:`~ascend_graph.errors.ConfigError` naming the key, with expected and got. ``compute_hash()`` feeds the graph-cache key, so it covers every field that
changes the generated code.

Environment variables are never read here (see STYLE.md): entry points read them and
pass values in.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .errors import ConfigError

__all__ = ["AscendConfig", "FUSION_FAMILIES", "PAD_ROLES"]

#: Fusion families the pass manager knows, in the order they run.
FUSION_FAMILIES = ("attention", "causal_conv1d", "gated_delta_rule", "moe", "norm_rope")

#: Old family names still accepted, mapped to the current one (``norm_act`` became
#: ``norm_rope`` when the family grew q/k norm + RoPE; kept for configs written before).
FUSION_ALIASES = {"norm_act": "norm_rope"}

#: How a padded row of a batch-dependent input is filled (runtime/padding.py owns the values).
PAD_ROLES = ("zero", "index", "slot", "kv_len", "cu_len", "mask")

_CODEGENS = ("auto", "inductor", "fx", "torchair")
_TORCHAIR_MODES = ("max-autotune", "npugraph_ex", "reduce-overhead")


def _doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    kwargs: dict[str, Any] = {"metadata": {"doc": text}}
    if factory is not dataclasses.MISSING:
        kwargs["default_factory"] = factory
    else:
        kwargs["default"] = default
    return field(**kwargs)


@dataclass(frozen=True)
class AscendConfig:
    """Options of one ``backend="ascend"`` compile. Every field is documented in README.md."""

    codegen: str = _doc("'auto' (inductor on CPU/CUDA, fx on NPU), 'inductor', 'fx' (run the post-pass FX graph as is), or 'torchair'", "auto")
    fusions: tuple[str, ...] = _doc("fusion families to run, a subset of FUSION_FAMILIES", FUSION_FAMILIES)
    cleanup: bool = _doc("run the cleanup passes (no-op views/clones, dead code) before and after fusion", True)
    batch_input: str | int | None = _doc("forward-argument name or graph-input index whose dim `batch_dim` is the batch; default: first non-parameter tensor input with a symbolic dim", None)
    batch_dim: int = _doc("which dim of `batch_input` is the batch", 0)
    graphs: bool = _doc("capture device graphs (CUDA/NPU) per bucket; on CPU the bucketed runner keeps the same semantics without graphs", True)
    buckets: tuple[int, ...] | None = _doc("batch-size buckets; None: vLLM's default list up to max_batch", None)
    max_batch: int = _doc("largest bucket of the default list", 256)
    num_speculative_tokens: int = _doc("k: buckets are rounded to multiples of 1+k", 0)
    max_graphs: int = _doc("cap on graphs per compiled function (keys of other dynamic symbols included); past it calls run without graphs", 64)
    warmup: bool = _doc("capture every bucket at the first call instead of lazily", False)
    pad_roles: tuple[tuple[str, str], ...] = _doc("(input name, role) pairs: how padded rows of that input are filled; roles in PAD_ROLES", ())
    stream_budget: int | None = _doc("NPU streams this compile may use for graphs (None: the device default, about 2048 less reserve)", None)
    memory_budget_bytes: int | None = _doc("graph-pool bytes the captured buckets may use together; a capture that would exceed it is dropped (counted as a capture failure) and its batches go to the next bucket up or run without graphs", None)
    cache_dir: str | None = _doc("offline graph cache directory (see `ascend-graph build`)", None)
    cache_strict: bool = _doc("with cache_dir: anything but a verified cache hit is a CacheError (expected/got) instead of a logged rebuild", False)
    specialize_floats: bool = _doc("float attributes of the model's modules that Dynamo passes as inputs (dynamic=True) become graph constants again, guarded by Dynamo in its first trace (a changed value recompiles; where a torch does not, a re-trace or a per-call check that runs a changed value eagerly, counted)", True)
    clone_outputs: bool = _doc("with device graphs: copy outputs out of the graph's static buffers so they survive the next replay", True)
    dump_dir: str | None = _doc("write each pass's before/after graph code here", None)
    debug: bool = _doc("graph.lint() after each pass; check static input addresses at replay", False)
    explain_node: str | None = _doc("name of a node: the pattern matcher logs why each pattern did or did not match it", None)
    torchair_mode: str = _doc("with codegen='torchair': 'max-autotune' (GE graph), 'npugraph_ex' or 'reduce-overhead' (ACL graph)", "max-autotune")
    inductor_config: tuple[tuple[str, Any], ...] = _doc("inductor config patches as (key, value) pairs", ())

    def __post_init__(self) -> None:
        # Every field is checked here, not only in from_options: AscendConfig(...) and
        # replace() are public too, and a value out of range would otherwise surface much
        # later as a silent behaviour change (no buckets, every capture dropped).
        for f in fields(self):
            _check_type(f.name, f.type, getattr(self, f.name))
        for name in ("fusions", "buckets"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        for name in _PAIR_FIELDS:
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, tuple(sorted(value.items())))
            elif not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if any(f in FUSION_ALIASES for f in self.fusions):
            renamed = tuple(dict.fromkeys(FUSION_ALIASES.get(f, f) for f in self.fusions))
            object.__setattr__(self, "fusions", renamed)  # frozen: normalised once, here
        if self.codegen not in _CODEGENS:
            raise ConfigError("unknown codegen", expected=f"one of {_CODEGENS}", got=repr(self.codegen))
        unknown = [f for f in self.fusions if f not in FUSION_FAMILIES]
        if unknown:
            raise ConfigError("unknown fusion family", expected=f"a subset of {FUSION_FAMILIES}", got=unknown)
        if self.torchair_mode not in _TORCHAIR_MODES:
            raise ConfigError("unknown torchair_mode", expected=f"one of {_TORCHAIR_MODES}", got=repr(self.torchair_mode))
        if self.buckets is not None:
            bad = [b for b in self.buckets if isinstance(b, bool) or not isinstance(b, int) or b < 1]
            if not self.buckets or bad:
                raise ConfigError(
                    "option 'buckets' must be a non-empty list of positive integers",
                    expected="e.g. [1, 2, 4, 8]",
                    got=repr(list(self.buckets)),
                )
        for name, minimum in _MINIMUMS.items():
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ConfigError(f"option {name!r} must be >= {minimum}", expected=f">= {minimum}" + (" or None" if name in _OPTIONAL_INTS else ""), got=value)
        for name, role in self.pad_roles:
            if role not in PAD_ROLES:
                raise ConfigError(f"unknown pad role for input {name!r}", expected=f"one of {PAD_ROLES}", got=role)
        if self.inductor_config:
            _check_inductor_keys(self.inductor_config)

    # -- construction ---------------------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | "AscendConfig" | None) -> "AscendConfig":
        """Build from a ``torch.compile`` options dict; unknown keys are an error."""
        if options is None:
            return cls()
        if isinstance(options, AscendConfig):
            return options
        if not isinstance(options, Mapping):
            raise ConfigError("options must be a dict", expected="dict[str, Any]", got=type(options).__name__)
        valid = cls.field_names()
        unknown = sorted(k for k in options if k not in valid)
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown} for backend='ascend'",
                expected=f"keys among {sorted(valid)}",
                got=unknown,
            )
        kwargs: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(cls)}
        for key, value in options.items():
            kwargs[key] = _coerce(key, types[key], value)
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "AscendConfig":
        return dataclasses.replace(self, **changes)

    @property
    def pad_role_map(self) -> dict[str, str]:
        return dict(self.pad_roles)

    # -- hashing --------------------------------------------------------------------

    def compute_hash(self) -> str:
        """Hash of every field that changes generated code (dump_dir/debug/explain_node do not)."""
        ignore = {"dump_dir", "debug", "explain_node", "cache_dir", "cache_strict", "warmup"}
        factors = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ignore}
        blob = json.dumps(factors, sort_keys=True, default=repr)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_TUPLE_FIELDS = {"fusions", "buckets"}
_PAIR_FIELDS = {"pad_roles", "inductor_config"}
#: lowest valid value of each integer option (None, where allowed, means "no limit")
_MINIMUMS = {
    "batch_dim": 0,
    "max_batch": 1,
    "num_speculative_tokens": 0,
    "max_graphs": 1,
    "stream_budget": 1,
    "memory_budget_bytes": 0,
}
_OPTIONAL_INTS = {"stream_budget", "memory_budget_bytes"}


def _coerce(key: str, annotation: str, value: Any) -> Any:
    """Accept the natural Python spellings (lists for tuples, dicts for pairs).

    Types and ranges are checked by ``AscendConfig.__post_init__``; here only the
    spellings that would otherwise be silently misread are rejected (a dict given as
    ``buckets`` would become its keys, a set has no order).
    """
    if key in _TUPLE_FIELDS:
        if value is None and "None" in annotation:
            return None
        if not isinstance(value, (list, tuple, range)):
            raise ConfigError(f"option {key!r} must be a list", expected="a list or tuple", got=repr(value))
        return tuple(value)
    if key in _PAIR_FIELDS:
        if isinstance(value, Mapping):
            return tuple(sorted((str(k), v) for k, v in value.items()))
        try:
            return tuple((str(k), v) for k, v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"option {key!r} must be a dict", expected="dict[str, ...]", got=repr(value)) from None
    return value


def _check_type(key: str, annotation: str, value: Any) -> None:
    """One field's value against its annotation; bools are not ints here."""
    if value is None and "None" in annotation:
        return
    if annotation == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"option {key!r} must be a bool", expected="True or False", got=repr(value))
    elif annotation in ("int", "int | None"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"option {key!r} must be an int", expected="int" + (" or None" if "None" in annotation else ""), got=repr(value))
    elif annotation in ("str", "str | None"):
        if not isinstance(value, str):
            raise ConfigError(f"option {key!r} must be a string", expected="str", got=repr(value))
    elif key == "batch_input":
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ConfigError("option 'batch_input' must be a name or an index", expected="str | int | None", got=repr(value))
    elif key in _TUPLE_FIELDS:
        if not isinstance(value, (list, tuple, range)):
            raise ConfigError(f"option {key!r} must be a list", expected="a list or tuple", got=repr(value))
    elif key in _PAIR_FIELDS:
        pairs = value.items() if isinstance(value, Mapping) else value
        ok = isinstance(value, (Mapping, tuple, list)) and all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in pairs
        )
        if not ok:
            raise ConfigError(f"option {key!r} must be a dict", expected="dict[str, ...]", got=repr(value))


def _check_inductor_keys(pairs: tuple[tuple[str, Any], ...]) -> None:
    """Every key must be one of inductor's config options (dotted for nested ones:
    ``"triton.cudagraphs"``); inductor's own patch() would fail later with a bare
    AttributeError, after Dynamo has traced the model."""
    from torch._inductor import config as inductor_config

    valid = set(inductor_config.get_config_copy())
    unknown = sorted(k for k, _ in pairs if k not in valid)
    if unknown:
        close = {k: difflib.get_close_matches(k, valid, n=3) for k in unknown}
        raise ConfigError(
            f"unknown inductor_config key(s) {unknown}",
            expected="keys of torch._inductor.config" + "".join(f"; for {k!r} did you mean {m}" for k, m in close.items() if m),
            got=unknown,
        )
