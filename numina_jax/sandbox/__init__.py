"""A bubblewrap sandbox for model-written python: `run_python` (a fresh interpreter per call), `PythonSession`
(stateful, one per trace), `SandboxPool` (calls in parallel). Limits and defaults: `SandboxConfig`."""

from numina_jax.sandbox.bwrap import find_bwrap
from numina_jax.sandbox.config import SandboxConfig, SandboxError
from numina_jax.sandbox.pool import SandboxPool
from numina_jax.sandbox.run import STATUSES, PythonSession, SandboxResult, run_python, shown_output

__all__ = ["STATUSES", "PythonSession", "SandboxConfig", "SandboxError", "SandboxPool", "SandboxResult",
           "find_bwrap", "run_python", "shown_output"]
