"""tests/npu_wheel.py: the torch-npu wheel is cached and reused, a failed download is tried
once per run, and in CI a missing wheel fails the contract tests instead of skipping them."""

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests import npu_wheel

REPO = Path(__file__).resolve().parents[1]


def _fake_wheel(root: Path) -> Path:
    root.mkdir(parents=True)
    path = root / f"torch_npu-{npu_wheel.VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(npu_wheel.MEMBERS[0], "at::Tensor npu_fake(const at::Tensor & self);\n")
        z.writestr(npu_wheel.MEMBERS[1], "# meta\n")
        z.writestr("torch_npu/dynamo/torchair/__init__.py", "")
        z.writestr("torch_npu/lib/unrelated.so", "x")
    return path


def test_a_cached_wheel_is_reused_without_calling_pip(tmp_path, monkeypatch):
    monkeypatch.setenv(npu_wheel.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(npu_wheel, "_failure", None)
    wheel = _fake_wheel(tmp_path / f"torch-npu-{npu_wheel.VERSION}")

    def no_pip(*args, **kwargs):
        raise AssertionError(f"pip called although the wheel is cached: {args}")

    monkeypatch.setattr(npu_wheel.subprocess, "run", no_pip)
    assert npu_wheel.wheel() == wheel
    out = npu_wheel.unpacked()
    assert "npu_fake" in npu_wheel.custom_functions_header()
    assert (out / "torch_npu/dynamo/torchair/__init__.py").is_file()
    assert not (out / "torch_npu/lib/unrelated.so").exists()  # only what the tests read
    assert npu_wheel.unpacked() == out  # second call: the unpacked files are reused as is
    assert not list(out.parent.glob(".unpack-*")) and not list(out.parent.glob(".download-*"))


def test_default_cache_dir_is_a_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(npu_wheel.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert npu_wheel.cache_root() == tmp_path / "ascend-graph" / "npu-wheel" / f"torch-npu-{npu_wheel.VERSION}"


# Three contract-style tests against an index that refuses connections, and a last test
# counting the pip calls the first three made.
_INNER = textwrap.dedent(
    """
    import subprocess, types
    from tests import npu_wheel

    calls = []
    _run = subprocess.run

    def _counting(cmd, *args, **kwargs):
        calls.append(cmd)
        return _run(cmd, *args, **kwargs)

    npu_wheel.subprocess = types.SimpleNamespace(run=_counting, TimeoutExpired=subprocess.TimeoutExpired)

    def test_header():
        npu_wheel.custom_functions_header()

    def test_meta():
        npu_wheel.meta_registrations_source()

    def test_wheel():
        npu_wheel.wheel()

    def test_zz_pip_was_called_once():
        assert len(calls) == 1, calls
    """
)


def _run_inner(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess:
    (tmp_path / "test_inner.py").write_text(_INNER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "CI"}
    env.update(
        PYTHONPATH=str(REPO),
        PIP_CONFIG_FILE=os.devnull,  # no configured index or find-links: only the broken one
        PIP_INDEX_URL="http://127.0.0.1:9/simple",
        **{npu_wheel.CACHE_ENV: str(tmp_path / "cache")},
    )
    if ci:
        env["CI"] = "true"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "test_inner.py"]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_missing_wheel_fails_the_run_in_ci_after_one_download_attempt(tmp_path):
    proc = _run_inner(tmp_path, ci=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "3 failed, 1 passed" in out, out
    assert "CI is set" in out and "wheel unavailable" in out
    assert "`pip download` exit 1" in out and "Connection refused" in out  # pip's own reason, passed on
    assert out.count("Connection refused") == 1  # reported by the first test only
    assert out.count("failed earlier in this run and is not retried") == 2


def test_missing_wheel_skips_with_the_reason_outside_ci(tmp_path):
    proc = _run_inner(tmp_path, ci=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "1 passed, 3 skipped" in out, out
    assert "SKIPPED" in out and "wheel unavailable" in out  # -rs prints the reason


@pytest.mark.parametrize("value, expected", [("", False), ("0", False), ("false", False), ("1", True), ("true", True)])
def test_ci_flag(monkeypatch, value, expected):
    monkeypatch.setenv("CI", value)
    assert npu_wheel.in_ci() is expected
