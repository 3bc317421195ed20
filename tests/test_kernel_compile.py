"""The compile check without a GPU: every Triton kernel variant the library can launch compiles
for sm_80 and sm_90 with no spills (fastimp.kernels.compile_check, in a subprocess: it needs
Triton's compiler, not the interpreter the tests run under), plus the CUDA kernels of the built
extension when it has them."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastimp import _ext
from fastimp.kernels import masked_sgd as ksgd


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("compile") / "reports.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastimp.kernels.compile_check", "--arch", "80", "90",
           "--json", str(out)]
    if _ext.cuda_compiled():
        cmd.append("--cuda-so")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert out.exists(), proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_every_variant_compiles_without_spills(reports):
    proc, rows = reports
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad
    assert proc.returncode == 0, proc.stderr[-3000:]
    triton_rows = [r for r in rows if not r["kernel"].startswith("CUDA")]
    # 16 masked SGD + 7 threshold + 12 weight_points variants, for each of the two targets
    assert len(triton_rows) == 2 * 35
    assert {r["arch"] for r in rows} == {80, 90}


def test_masked_sgd_launch_config_keeps_registers_low(reports):
    """The launched masked SGD config (not the 212-register BLOCK 4096 / 8 warps one) leaves
    room for several programs per SM for every dtype but float64."""
    _, rows = reports
    sgd = [r for r in rows if r["kernel"].startswith("masked_sgd")]
    assert {r["num_warps"] for r in sgd} == {ksgd.GPU_CONFIG[1]}
    for r in sgd:
        if "float64" not in r["kernel"]:
            assert r["regs"] <= 96 and r["blocks_per_sm"] >= 5, r


@pytest.mark.skipif(not _ext.cuda_compiled(), reason="extension built without CUDA")
def test_cuda_kernels_of_the_extension_do_not_spill(reports):
    _, rows = reports
    cuda = [r for r in rows if r["kernel"].startswith("CUDA")]
    assert {r["arch"] for r in cuda} == {80, 90}
    assert any("masked_sgd_kernel float64" in r["kernel"] for r in cuda)
    assert all(r["local"] == 0 and r["stack"] == 0 for r in cuda)


def test_variants_cover_the_launch_constexprs():
    """What launch() passes as compile-time arguments is one of the enumerated variants."""
    listed = [v[3] for v in ksgd.variants()]
    for dtype in ksgd.TL_DTYPES:
        for has_mom in (False, True):
            for aligned in (False, True):
                assert ksgd.constexprs(dtype, has_mom, aligned, ksgd.GPU_CONFIG[0]) in listed
    assert torch.float64 in ksgd.TL_DTYPES


def test_weight_points_variants_include_unaligned_views():
    """weight_points takes its tensors as kernel arguments, which Triton specializes on 16-byte
    alignment: a view starting inside its storage launches a variant with that pointer
    unaligned. The variant with no pointer aligned (the most general) is compiled for every
    dtype and D type."""
    from fastimp.kernels import weight_points as kwp
    general = {(v[2]["origin_ptr"], v[2]["D"]) for v in kwp.variants() if v[4] == ()}
    assert general == {(f"*{dt}", d) for dt in ("fp32", "fp64") for d in ("i32", "i64")}
