"""The Ray worker side of `python -m kpo_kernels.integrations.openrlhf`, kept free of OpenRLHF imports.

`setup` is the `worker_process_setup_hook` the launcher gives Ray: it runs first in every Ray
worker of the job (actors and vLLM engines alike). It calls `kpo_kernels.integrations.openrlhf.enable`
with the launcher's options (environment variable `KPO_OPENRLHF_OPTIONS`) once
`openrlhf.trainer.ray.ppo_actor` is imported: at once if it is, otherwise right after its import,
so that a worker that never imports it (a vLLM engine) imports nothing more than `kpo_kernels`
itself: not OpenRLHF's actor module, not DeepSpeed.
"""

import importlib.abc
import importlib.util
import json
import os
import sys

ENV_VAR = "KPO_OPENRLHF_OPTIONS"
HOOK = "kpo_kernels.integrations._openrlhf_worker.setup"
TARGET = "openrlhf.trainer.ray.ppo_actor"


def _enable():
    from .openrlhf import enable

    enable(**json.loads(os.environ.get(ENV_VAR, "{}")))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of TARGET so that `_enable` runs after it."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_enable(module):
            exec_module(module)
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            _enable()

        spec.loader.exec_module = exec_then_enable
        return spec


def setup():
    """Enable KPO in this process's OpenRLHF actor trainers (see the module docstring).

    Returns:
        None.
    """
    if TARGET in sys.modules:
        _enable()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
