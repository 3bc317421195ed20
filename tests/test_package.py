import os
import shutil
import subprocess
import sys

import pytest

import fastimp
from fastimp import _backend, _ext


def test_extension_built_when_required():
    if os.environ.get("FASTIMP_REQUIRE_EXT") != "1":
        pytest.skip("FASTIMP_REQUIRE_EXT is not set")
    assert _ext._C is not None, _ext.error
    if shutil.which("nvcc") and os.environ.get("FASTIMP_BUILD_CUDA") != "0":
        assert _ext.cuda_compiled(), "nvcc is present, so the CUDA kernels must have been compiled"


def test_backends_report_every_op_and_reason():
    table = fastimp.backends()
    assert {"masked_sgd", "magnitude_threshold", "weight_points"} <= set(table)
    for per_dev in table.values():
        assert per_dev["cpu"]["torch"].available
        for per_b in per_dev.values():
            for st in per_b.values():
                assert st.reason


def test_resolve_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        _backend.resolve("masked_sgd", "fortran", "cpu")
    with pytest.raises(ValueError, match="unknown op"):
        _backend.resolve("no_such_op", "auto", "cpu")


def test_cli_backends_runs():
    out = subprocess.run([sys.executable, "-m", "fastimp", "backends"], capture_output=True,
                         text=True, check=True).stdout
    assert "masked_sgd" in out
