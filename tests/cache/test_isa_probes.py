"""Every entry keeps inductor's vector-ISA probe binaries, even ones compiled before its build.

A process that loads only one entry (a server whose first graph is the batch-dynamic
one) would otherwise compile the probes again: about ten C++ builds.
"""

from __future__ import annotations

from torch._inductor import cpu_vec_isa

from ascend_graph.cache import store as store_mod


def test_probes_compiled_before_the_build_are_collected(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "_inductor_cache_dir", lambda: str(tmp_path))
    monkeypatch.setattr(store_mod, "triton_cache_dir", lambda: None)
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "cabprobe.cpp").write_text(cpu_vec_isa.VecISA._avx_code)
    (tmp_path / "ab" / "cabprobe.so").write_bytes(b"probe")
    (tmp_path / "cd").mkdir()
    (tmp_path / "cd" / "ccdkernel.cpp").write_text("extern \"C\" void kernel() {}")
    (tmp_path / "cd" / "ccdkernel.so").write_bytes(b"another graph's kernel")
    with store_mod.KernelRecorder() as recorder:  # both binaries exist before the build
        (tmp_path / "cd" / "ccdnew.so").write_bytes(b"this build's kernel")
    assert recorder.collect() == {"kernels/ab/cabprobe.so": b"probe", "kernels/cd/ccdnew.so": b"this build's kernel"}
