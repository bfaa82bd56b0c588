import os


# The suite is dominated by XLA compiling many small programs, not by running them:
# LLVM's optimisation passes are skipped (about 15% off the suite on a 2-core CPU).
# Set before JAX starts its backend, so the subprocesses that some tests start
# inherit it too. Results are IEEE arithmetic either way; a value the caller
# already put in XLA_FLAGS wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402


jax.config.update("jax_enable_x64", True)
