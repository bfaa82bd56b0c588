import os
import subprocess
import sys


# The suite is dominated by XLA compiling many small programs, not by running them,
# so it asks XLA to compile faster: LLVM's optimisation passes are skipped (about 15%
# off the suite on a 2-core CPU), and kernels come from XLA's older emitters (about
# 30% more: the default ones pay a fixed cost per fused kernel; measured 11m26s ->
# 8m07s for the whole suite). Results are IEEE arithmetic either way, only rounded in
# a different order where kernels fuse differently. Set before JAX starts its
# backend, so that the subprocesses some tests start inherit them. A flag the caller
# already put in XLA_FLAGS wins (e.g. `XLA_FLAGS=--xla_cpu_use_fusion_emitters=true`
# runs the suite with XLA's default emitters).
_FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
)


def _xla_accepts(flags: str) -> bool:
    # XLA aborts on a flag it does not know, and flags come and go between jaxlib
    # releases: try them in a throwaway process first.
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"],
        env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
    )
    return probe.returncode == 0


def _add_fast_compile_flags() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    missing = [f for f in _FAST_COMPILE_FLAGS if f.split("=")[0] not in flags]
    # One probe for all of them; only if XLA refuses that, one per flag.
    if missing and not _xla_accepts(" ".join([flags, *missing]).strip()):
        missing = [f for f in missing if _xla_accepts(f"{flags} {f}".strip())]
    os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()


_add_fast_compile_flags()

import jax  # noqa: E402


jax.config.update("jax_enable_x64", True)
