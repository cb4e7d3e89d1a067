"""Run interpreted Triton programs concurrently, one thread each, as a GPU runs a co-resident grid.

Triton's interpreter runs a grid's programs one after another, so a kernel whose programs wait for
each other (the grid barrier of kernels/birnn.py) never returns there. ``concurrent_programs``
starts every program in its own thread instead and joins them all at the end of the launch; a
program spinning at a barrier then waits for the others, as on a GPU. So the interpreter runs, and
the tests check, what a GPU runs where a direction's hidden units span several programs: the h
exchange, the barrier, batch blocks looped over. ``held_back=n`` starts the grid's last n programs
only once all the others have finished: what a GPU does with a grid larger than it can hold at once. It models neither the GPU's memory ordering nor its
timing: the threads take turns under the GIL, in near lockstep, so a missing barrier gives wrong
results only some of the time.

It relies on details of the interpreter (checked with triton 3.9): ``GridExecutor`` calls its ``fn``
once per program right after ``interpreter_builder.set_grid_idx`` (and otherwise reads only its
name, signature and globals), ``tl.program_id`` reads ``InterpreterBuilder.grid_idx``, made
thread-local here, and atomics and loads go through ``InterpreterBuilder.create_atomic_rmw`` and
``create_masked_load``; an ``InterpretedFunction`` (a kernel or a device function) parses its source
in ``rewrite`` on its first call, here in whichever program thread calls it first.
"""
import contextlib
import functools
import inspect
import math
import os
import sys
import threading
import time

from triton.runtime import interpreter

# A hung launch fails its test instead of the whole run. The slowest grid test takes about 10 s on
# a quiet 2-core machine. (CI's one 60 s timeout, at 09e2982, was likely the parse failure below
# with the other programs polling tags on: loads did not abort a launch then.)
TIMEOUT_S = 300
# Each program thread's launch, for the atomics to see whether that launch was aborted.
_local = threading.local()
# One rewrite (ast.parse, compile) at a time: CPython 3.11's AST constructor keeps its recursion depth
# per interpreter, not per thread, so two threads parsing at once can fail with "SystemError: AST
# constructor recursion depth mismatch" (python/cpython#106905; stop 36's CI failure, two programs
# reaching a device function's first call together). Reentrant: a rewrite may reach another.
_rewrite_lock = threading.RLock()


class _ThreadLocalGridIdx:
    """``grid_idx`` per thread: each program's own (x, y, z)."""

    def __init__(self):
        self.local = threading.local()

    def __get__(self, builder, owner=None):
        return self.local.idx

    def __set__(self, builder, idx):
        self.local.idx = idx


class _Launch:
    """Stands for a GridExecutor's ``fn``: each call starts the current program in a thread; the last
    one waits for them all and raises the first program's error."""

    def __init__(self, fn, held_back):
        self.fn = fn
        self.held_back = held_back
        self.waiting = []  # (grid index, kwargs) of the programs held back
        self.threads = []
        self.errors = []
        # Set when a program failed or the launch timed out: the programs still spinning at a barrier
        # (atomics) or polling tags (loads) stop at their next one instead of spinning on behind the
        # tests that follow.
        self.aborted = threading.Event()
        # What the executor reads from its fn besides calling it: name, signature, globals.
        functools.update_wrapper(self, fn, updated=())
        self.__signature__ = inspect.signature(fn)
        self.__globals__ = fn.__globals__

    def _program(self, idx, kwargs):
        try:
            interpreter.interpreter_builder.grid_idx = idx
            _local.launch = self
            self.fn(**kwargs)
        except BaseException as error:  # re-raised in the launching thread
            self.errors.append(error)
            self.aborted.set()

    def _start(self, idx, kwargs):
        thread = threading.Thread(target=self._program, args=(idx, kwargs), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _join(self, deadline):
        threads, self.threads = self.threads, []
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            where = _where(threads)
            self.aborted.set()
            for thread in threads:
                thread.join(1.0)
            raise TimeoutError(f"the grid's programs did not finish in {TIMEOUT_S} s: a barrier that never opens? "
                               f"Programs still running: {where}") from (self.errors[0] if self.errors else None)

    def __call__(self, **kwargs):
        builder = interpreter.interpreter_builder
        total = math.prod(builder.grid_dim)
        if len(self.threads) + len(self.waiting) >= total - self.held_back:
            self.waiting.append((builder.grid_idx, kwargs))
        else:
            self._start(builder.grid_idx, kwargs)
        if len(self.threads) + len(self.waiting) < total:
            return
        deadline = time.monotonic() + TIMEOUT_S
        self._join(deadline)
        waiting, self.waiting = self.waiting, []
        for idx, held in waiting:
            self._start(idx, held)
        self._join(deadline)
        if self.errors:
            raise self.errors[0]


def _where(threads):
    """Where each live program thread is in the kernel's source: the innermost frames of files under
    a kernels/ directory (function:line), and the step s where one has it (what a hang's report needs)."""
    frames = sys._current_frames()
    where = []
    for thread in threads:
        frame = frames.get(thread.ident) if thread.is_alive() else None
        stack, step = [], None
        while frame is not None:
            if f"{os.sep}kernels{os.sep}" in frame.f_code.co_filename:
                if len(stack) < 3:
                    stack.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
                if step is None and isinstance(frame.f_locals.get("s"), int):
                    step = frame.f_locals["s"]
            frame = frame.f_back
        if thread.is_alive():
            where.append(" < ".join(stack) + (f" (s = {step})" if step is not None else ""))
    return "; ".join(where)


def _one_at_a_time(rewrite):
    """InterpretedFunction.rewrite under _rewrite_lock."""
    def serialized(function):
        with _rewrite_lock:
            return rewrite(function)

    return serialized


def _abortable(builder_op):
    """builder_op (an atomic, a load) that raises in a program thread of an aborted launch."""
    def abortable(builder, *args, **kwargs):
        launch = getattr(_local, "launch", None)
        if launch is not None and launch.aborted.is_set():
            raise RuntimeError("the launch was aborted: another program failed, or it timed out")
        return builder_op(builder, *args, **kwargs)

    return abortable


@contextlib.contextmanager
def concurrent_programs(held_back=0):
    """Within the block, interpreted launches run all their programs at once, but for the last
    held_back, which start when the others have finished."""
    init = interpreter.GridExecutor.__init__
    atomic_rmw = interpreter.InterpreterBuilder.create_atomic_rmw
    masked_load = interpreter.InterpreterBuilder.create_masked_load
    previous_idx = interpreter.InterpreterBuilder.__dict__.get("grid_idx")
    rewrite = interpreter.InterpretedFunction.rewrite

    def concurrent_init(executor, fn, *args, **kwargs):
        init(executor, fn, *args, **kwargs)
        executor.fn = _Launch(executor.fn, held_back)

    # Programs spinning at a barrier hold the GIL for a whole switch interval: keep it short.
    interval = sys.getswitchinterval()
    interpreter.GridExecutor.__init__ = concurrent_init
    interpreter.InterpreterBuilder.create_atomic_rmw = _abortable(atomic_rmw)
    interpreter.InterpreterBuilder.create_masked_load = _abortable(masked_load)
    interpreter.InterpreterBuilder.grid_idx = _ThreadLocalGridIdx()
    interpreter.InterpretedFunction.rewrite = _one_at_a_time(rewrite)
    sys.setswitchinterval(1e-4)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)
        interpreter.GridExecutor.__init__ = init
        interpreter.InterpreterBuilder.create_atomic_rmw = atomic_rmw
        interpreter.InterpreterBuilder.create_masked_load = masked_load
        interpreter.InterpretedFunction.rewrite = rewrite
        if previous_idx is None:
            del interpreter.InterpreterBuilder.grid_idx
        else:
            interpreter.InterpreterBuilder.grid_idx = previous_idx
