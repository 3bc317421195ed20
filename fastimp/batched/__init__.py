"""Many runs, one program: N independent trainings of one architecture packed into one wide
module (:mod:`fastimp.batched.pack`) and trained together (:mod:`fastimp.batched.engine`,
``fastimp.training.train_batched``)."""
from .pack import CannotPack, PackedLinear, pack, register_packer, unpack_, verify

__all__ = ["CannotPack", "PackedLinear", "pack", "register_packer", "unpack_", "verify",
           "train_batched", "BatchingFallbackWarning"]


def __getattr__(name):
    if name in ("train_batched", "BatchingFallbackWarning"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'fastimp.batched' has no attribute {name!r}")
