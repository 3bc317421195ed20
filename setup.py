"""Build of the optional compiled extension ``fastimp._C``.

The C++/OpenMP CPU kernels are always built when a C++ compiler is present; the CUDA kernels when
``nvcc`` and a CUDA-enabled torch are present (``FASTIMP_BUILD_CUDA=0/1`` forces either way).
``FASTIMP_NO_EXT=1`` skips the extension entirely. A failed build never stops the install: the
extension is optional and fastimp falls back to its Triton and PyTorch backends (see
``fastimp.backends()``).
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[fastimp setup] {msg}", file=sys.stderr)


def _find_cuda_home():
    """The CUDA toolkit root: where bin/nvcc and the cudart library both are (nvcc on the PATH
    may be a wrapper script outside the toolkit)."""
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            candidates += [os.path.dirname(os.path.dirname(p))
                           for p in re.findall(r"(/\S+/bin/nvcc)\b", head)]
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        has_nvcc = os.path.exists(os.path.join(root, "bin", "nvcc"))
        has_rt = any(glob.glob(os.path.join(root, d, "libcudart.so*")) for d in ("lib64", "lib"))
        if has_nvcc and has_rt:
            return root
    return None


def _want_cuda(torch):
    flag = os.environ.get("FASTIMP_BUILD_CUDA", "").strip()
    if flag == "0":
        return False
    home = os.environ.get("CUDA_HOME") or _find_cuda_home()
    if home:
        os.environ["CUDA_HOME"] = home
        from torch.utils import cpp_extension
        cpp_extension.CUDA_HOME = home  # torch looked for it at import, before we set it
    has = home is not None and torch.version.cuda is not None
    if flag == "1" and not has:
        raise RuntimeError("FASTIMP_BUILD_CUDA=1 but nvcc or a CUDA-enabled torch is missing")
    return has


def extensions():
    if os.environ.get("FASTIMP_NO_EXT") == "1":
        _log("FASTIMP_NO_EXT=1: skipping the compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not importable at build time: installing without the compiled extension "
             "(install torch first and use `pip install --no-build-isolation`)")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        _log("no C++ compiler found: installing without the compiled extension")
        return [], {}

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]
    link = ["-fopenmp"]
    if _want_cuda(torch):
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc = ["-O3", "-DFASTIMP_WITH_CUDA", "-lineinfo"]
        ext = cpp_extension.CUDAExtension(
            "fastimp._C", sources,
            extra_compile_args={"cxx": cxx + ["-DFASTIMP_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link, optional=True)
        _log(f"building fastimp._C with CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}")
    else:
        ext = cpp_extension.CppExtension(
            "fastimp._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link,
            optional=True)
        _log("building fastimp._C with the C++ CPU kernels only")
    build = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None
                                                      or _has_ninja_module())
    return [ext], {"build_ext": build}


def _has_ninja_module():
    try:
        import ninja  # noqa: F401
        return True
    except ImportError:
        return False


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
