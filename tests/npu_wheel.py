"""The torch-npu 2.13.0 wheel, downloaded (never installed) and unpacked for contract tests.

The NPU bindings (tests/ops/test_npu_contract.py) and the TorchAir adapter
(tests/integrations/test_torchair_contract.py; TorchAir ships inside the torch-npu wheel,
under ``torch_npu/dynamo/torchair``) are held to the real API by reading this wheel.
torch-npu must never be installed here: without CANN it breaks ``import torch``.

- Where: ``$ASCEND_GRAPH_NPU_WHEEL_CACHE`` if set, else
  ``${XDG_CACHE_HOME:-~/.cache}/ascend-graph/npu-wheel``; one subdirectory per version.
  The wheel is downloaded once (``pip download --no-deps``) and reused by every test and
  every later run; the files the tests read are unpacked next to it. Downloads and
  unpacking go through a temporary directory and a rename under a file lock, so two
  test runs at once never see half a wheel.
- A failed download is tried once per test run: later tests get the same reason without
  another ``pip download`` (one run used to call it once per test, 29 times).
- Without the wheel the contract tests skip with the reason; when ``CI`` is set they
  fail instead, since these are the only tests holding the NPU code to the real API and
  a green run without them would be a false one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator, NoReturn

import pytest

VERSION = "2.13.0"
CACHE_ENV = "ASCEND_GRAPH_NPU_WHEEL_CACHE"
MEMBERS = (
    "torch_npu/include/torch_npu/csrc/aten/CustomFunctions.h",
    "torch_npu/op_plugin/meta/_meta_registrations.py",
)
PREFIXES = ("torch_npu/dynamo/torchair/", "torch_npu/dynamo/npugraph_ex/")
#: pip's own defaults here (timeout 180 s, 5 retries) would hold a broken index for minutes
PIP_ARGS = ("--no-deps", "-q", "--retries", "1", "--timeout", "60")

#: why the wheel could not be had, once a download failed in this process
_failure: str | None = None


def cache_root() -> Path:
    """This version's directory in the user cache (created on first download)."""
    base = os.environ.get(CACHE_ENV)
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        base = os.path.join(xdg, "ascend-graph", "npu-wheel")
    return Path(base) / f"torch-npu-{VERSION}"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> NoReturn:
    """Skip the calling test with the reason, or fail it when ``CI`` is set."""
    root = cache_root()
    message = (
        f"torch-npu {VERSION} wheel unavailable, so the NPU/TorchAir contract tests cannot run: {reason}. "
        f"Fix: `pip download torch-npu=={VERSION} --no-deps -d {root}` on a machine with PyPI access "
        f"(or point ${CACHE_ENV} at a directory holding torch-npu-{VERSION}/torch_npu-*.whl)"
    )
    if in_ci():
        pytest.fail(message + ". CI is set: a contract test that cannot run fails the run.", pytrace=False)
    pytest.skip(message)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    with open(root / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached_wheel(root: Path) -> Path | None:
    found = sorted(root.glob("torch_npu-*.whl"))
    return found[0] if found else None


def _pip_reason(proc: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (proc.stderr or proc.stdout or "").splitlines() if line.strip()]
    return f"`pip download` exit {proc.returncode}: " + (" | ".join(lines[-3:])[-600:] or "no output")


def wheel() -> Path:
    """Path of the cached wheel, downloading it the first time (once per run at most)."""
    global _failure
    if _failure is not None:
        # the first test that asked carries pip's full output; the rest name the last line
        unavailable(f"the download failed earlier in this run and is not retried ({_failure.split(' | ')[-1]})")
    root = cache_root()
    found = _cached_wheel(root) if root.is_dir() else None
    if found is not None:
        return found
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root):
            found = _cached_wheel(root)  # another run may have finished it meanwhile
            if found is not None:
                return found
            tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
            try:
                cmd = [sys.executable, "-m", "pip", "download", f"torch-npu=={VERSION}", *PIP_ARGS, "-d", str(tmp)]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                except subprocess.TimeoutExpired:
                    _failure = "`pip download` took over 900 s"
                    unavailable(_failure)
                got = sorted(tmp.glob("torch_npu-*.whl"))
                if proc.returncode != 0 or not got:
                    _failure = _pip_reason(proc)
                    unavailable(_failure)
                os.replace(got[0], root / got[0].name)
                return root / got[0].name
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        _failure = f"cannot write the wheel cache {root}: {e}"
        unavailable(_failure)


def unpacked() -> Path:
    """Directory holding the unpacked members (skips, or fails in CI, without the wheel)."""
    global _failure
    root = cache_root()
    out = root / "files"
    if (root / ".complete").exists() and all((out / m).is_file() for m in MEMBERS):
        return out
    path = wheel()
    try:
        with _locked(root):
            if (root / ".complete").exists() and all((out / m).is_file() for m in MEMBERS):
                return out
            tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root))
            try:
                with zipfile.ZipFile(path) as z:
                    names = [n for n in z.namelist() if n in MEMBERS or n.startswith(PREFIXES)]
                    missing = [m for m in MEMBERS if m not in names]
                    if missing:
                        _failure = f"{path.name} lacks {missing}"
                        unavailable(_failure)
                    for name in names:
                        z.extract(name, tmp)
                os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a shared cache is read by others
                shutil.rmtree(out, ignore_errors=True)
                os.replace(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            (root / ".complete").write_text(path.name)
    except zipfile.BadZipFile as e:
        # a damaged cached wheel: drop it so the next run downloads it again
        path.unlink(missing_ok=True)
        _failure = f"the cached {path.name} is not a valid zip ({e}); removed, rerun to download it again"
        unavailable(_failure)
    except OSError as e:
        _failure = f"cannot unpack into {root}: {e}"
        unavailable(_failure)
    return out


def custom_functions_header() -> str:
    return (unpacked() / MEMBERS[0]).read_text()


def meta_registrations_source() -> str:
    return (unpacked() / MEMBERS[1]).read_text()
