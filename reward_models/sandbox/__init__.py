"""A sandbox for untrusted programs (model output is untrusted).

``Sandbox.run`` runs one program; ``SandboxPool`` runs many in parallel. Layers (each
reported, and warned about once in the log when a machine lacks it): pid, network and
mount namespaces; a read-only view of the host with a private tmpfs work dir; an
unprivileged uid with no_new_privs; rlimits on CPU time, address space, file size,
processes and open files; a wall-clock kill; capped output; a clean environment.
See docs/rewards.md for the guarantees and their limits.
"""

from reward_models.sandbox.limits import Limits
from reward_models.sandbox.pool import Job, SandboxPool
from reward_models.sandbox.runner import STATUSES, RunResult, Sandbox

__all__ = ["STATUSES", "Job", "Limits", "RunResult", "Sandbox", "SandboxPool"]
