"""A ``sitecustomize`` for profiling a job's start-up, process by process (see bench/slots.py).

:func:`bench.slots.hook_dir` copies this file as ``sitecustomize.py`` into a folder put first on
``PYTHONPATH``, so that every Python process of the job (``batchproc run``, the launcher,
torchrun's agent, each worker) runs it at start. With ``BATCHPROC_PROFILE_DIR`` set, each process
writes ``<pid>.json`` there at exit: when it started, its parent, its command line, when its
imports of torch, torchvision and batchproc began and ended, and, in a worker, when
``torch_batch_process`` began, its process group was up, the processor was built (the model
load), the first batch was done, and how long ``process_batch`` took in all (the model, the rest
being the wait for the loader), its torch threads and its loader worker processes.
Nothing here changes what the job does; without the variable it does nothing.
"""

import os
import time

_T_START = time.time()
_DIR = os.environ.get("BATCHPROC_PROFILE_DIR")

if _DIR:
    import atexit
    import importlib.abc
    import json
    import sys

    _REC = {"pid": os.getpid(), "ppid": os.getppid(), "start": _T_START, "imports": {}, "marks": {}}
    _WATCH = ("torch", "torchvision", "batchproc", "torch.distributed.run", "pyarrow")
    _PATCH = {}

    def _mark(name, when=None):
        _REC["marks"].setdefault(name, time.time() if when is None else when)

    def _children():
        n = 0
        try:
            for tid in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{tid}/children") as f:
                    n += len(f.read().split())
        except OSError:
            pass
        return n

    class _Finder(importlib.abc.MetaPathFinder):
        """Times the first import of each watched module and patches a few after they run."""

        def find_spec(self, name, path=None, target=None):
            if (name not in _WATCH and name not in _PATCH) or name in _REC["imports"]:
                return None
            _REC["imports"][name] = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
            loader = spec.loader
            original = getattr(loader, "exec_module", None)
            if original is None:
                return spec

            def exec_module(module, _original=original, _name=name):
                t = time.time()
                try:
                    _original(module)
                finally:
                    _REC["imports"][_name] = [t, time.time()]
                if _name in _PATCH:
                    _PATCH[_name](module)

            loader.exec_module = exec_module
            return spec

    def _patch_run(module):
        original = module.torch_batch_process

        def torch_batch_process(*args, **kwargs):
            _mark("tbp_start")
            try:
                return original(*args, **kwargs)
            finally:
                _mark("tbp_end")

        module.torch_batch_process = torch_batch_process

    def _patch_distributed(module):
        original = module.init_process_group

        def init_process_group(*args, **kwargs):
            _mark("pg_start")
            try:
                return original(*args, **kwargs)
            finally:
                _mark("pg_end")

        module.init_process_group = init_process_group

    def _patch_processor(module):
        base = module.TorchBatchProcessor
        batch = {"n": 0, "in": 0.0, "last_end": None, "gap": 0.0}
        _REC["batches"] = batch

        def wrap_init(init):
            def __init__(self, *args, **kwargs):
                _mark("processor_init_start")
                try:
                    init(self, *args, **kwargs)
                finally:
                    _mark("processor_init_end")
                    import torch

                    _REC["torch_threads"] = torch.get_num_threads()
            return __init__

        def wrap_batch(fn):
            def process_batch(self, *args, **kwargs):
                t = time.time()
                if batch["last_end"] is not None:
                    batch["gap"] += t - batch["last_end"]
                else:
                    _mark("first_batch_start", t)
                    _REC["loader_workers"] = _children()
                try:
                    return fn(self, *args, **kwargs)
                finally:
                    end = time.time()
                    _mark("first_batch_end", end)
                    batch["n"] += 1
                    batch["in"] += end - t
                    batch["last_end"] = end
            return process_batch

        def __init_subclass__(cls, **kwargs):
            super(base, cls).__init_subclass__(**kwargs)
            if "__init__" in cls.__dict__ and not getattr(cls.__init__, "_profiled", False):
                cls.__init__ = wrap_init(cls.__dict__["__init__"])
                cls.__init__._profiled = True
            if "process_batch" in cls.__dict__ and not getattr(cls.process_batch, "_profiled", False):
                cls.process_batch = wrap_batch(cls.__dict__["process_batch"])
                cls.process_batch._profiled = True

        base.__init_subclass__ = classmethod(__init_subclass__)

    _PATCH.update({"batchproc.engine.run": _patch_run, "torch.distributed": _patch_distributed,
                   "batchproc.processor": _patch_processor})
    sys.meta_path.insert(0, _Finder())

    def _write():
        _REC["end"] = time.time()
        _REC["argv"] = list(sys.argv)
        try:
            with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
                _REC["cmdline"] = [w.decode(errors="replace") for w in f.read().split(b"\0") if w]
        except OSError:
            pass
        if _REC["pid"] != os.getpid():  # a forked child (a loader worker) inherits atexit: not ours
            return
        path = os.path.join(_DIR, f"{os.getpid()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(_REC, f)
        os.replace(path + ".tmp", path)

    atexit.register(_write)
