"""Test configuration. Triton runs through its CPU interpreter unless a GPU is present; the
variable must be set before Triton is first imported, hence here."""
import os
import shutil

if "TRITON_INTERPRET" not in os.environ and not (
        os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi")):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from fastimp import _backend  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def devices():
    """Devices to test on: the CPU always, CUDA when present."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: tiny models on a busy 2-core machine run many times
    faster that way (OpenMP threads spin against each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def need_backend(op: str, backend: str, device: str = "cpu") -> None:
    """Skip unless ``backend`` runs ``op`` here; a missing compiled cpu backend fails instead
    when FASTIMP_REQUIRE_EXT=1 (as make test sets)."""
    st = _backend.status(op, backend, device)
    if not st:
        if backend == "cpu" and os.environ.get("FASTIMP_REQUIRE_EXT") == "1":
            pytest.fail(f"cpu backend missing: {st.reason}")
        pytest.skip(st.reason)


@pytest.fixture
def pack_widths(monkeypatch):
    """How many runs each call of fastimp.batched's pack() packed (the packability probe and
    every packed segment), in order."""
    from fastimp.batched import engine
    widths = []
    real = engine.pack

    def spy(models):
        widths.append(len(models))
        return real(models)
    monkeypatch.setattr(engine, "pack", spy)
    return widths
