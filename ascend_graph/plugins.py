"""How the core reaches its adapters without importing them: two entry-point groups.

Entry points: :func:`host_compile` (is a host program, such as vLLM, compiling right
now, and what does it ask for?) and :func:`codegen` (a code generator an adapter
provides, such as TorchAir). The core never imports ``ascend_graph.integrations``; the
adapters declare themselves in ``pyproject.toml`` and depend on the core:

- ``ascend_graph.hosts``: each entry is a callable ``() -> HostCompile | None``, asked
  at every compile in order; the first that returns a :class:`HostCompile` wins. A host
  answers None when the compile is not its own (vLLM: no current vLLM config), so a
  plain ``torch.compile(model, backend="ascend")`` sees none.
- ``ascend_graph.codegens``: ``name -> callable(gm, example_inputs, config)``, for
  ``AscendConfig.codegen`` values the core does not implement itself.

:func:`register_host` adds a hook in-process (tests, or a program that embeds ascend-graph
without installing it). Entry points are read once per process, at the first compile.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Mapping

from .errors import ConfigError

__all__ = ["HostCompile", "host_compile", "register_host", "codegen", "HOSTS_GROUP", "CODEGENS_GROUP"]

log = logging.getLogger("ascend_graph.plugins")

HOSTS_GROUP = "ascend_graph.hosts"
CODEGENS_GROUP = "ascend_graph.codegens"


@dataclass(frozen=True)
class HostCompile:
    """What a host program asks of one compile."""

    #: the host's name, for logs and errors ("vllm")
    name: str
    #: option defaults read from the host's settings; the user's explicit options win
    options: Mapping[str, Any] = field(default_factory=dict)
    #: builds the pass manager for the final config (the host's own op fusions appended)
    pass_manager: Callable[[Any], Any] | None = None
    #: wrap the compiled graph in the bucketed runner; False where the host batches and
    #: pads itself and wants no device graphs of ours (vLLM with no capture sizes: the
    #: runner would only pad and copy)
    runtime: bool = True


_registered: list[Callable[[], HostCompile | None]] = []


def register_host(hook: Callable[[], HostCompile | None]) -> None:
    """Ask ``hook`` at every compile, before the entry-point hooks."""
    if hook not in _registered:
        _registered.append(hook)


@functools.lru_cache(maxsize=None)
def _entry_point_hooks() -> tuple[Callable[[], HostCompile | None], ...]:
    hooks = []
    for ep in metadata.entry_points(group=HOSTS_GROUP):
        try:
            hooks.append(ep.load())
        except Exception as e:  # a broken third-party adapter must not break every compile
            log.warning("ignoring host adapter %s (%s): %s", ep.name, ep.value, e)
    return tuple(hooks)


def host_compile() -> HostCompile | None:
    """The running host's request for this compile, or None for a plain ``torch.compile``."""
    for hook in (*_registered, *_entry_point_hooks()):
        found = hook()
        if found is not None:
            return found
    return None


def codegen(name: str) -> Callable[..., Any]:
    """The code generator an adapter registered under ``name``."""
    eps = {ep.name: ep for ep in metadata.entry_points(group=CODEGENS_GROUP)}
    if name not in eps:
        raise ConfigError(
            f"no code generator named {name!r} is installed",
            expected=f"a name in the {CODEGENS_GROUP!r} entry points: {sorted(eps)}",
            got=name,
        )
    return eps[name].load()
