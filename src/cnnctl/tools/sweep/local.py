"""The local executor: trials in worker processes, as many at a time as the executor says, each with its share
of the threads; Ctrl-C and SIGTERM stop them all, and a trial whose process dies fails alone."""


from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path
from queue import Empty

from cnnctl.core import parallel
from cnnctl.core.schedules import resolve_mode

from .results import write_results
from .spec import SweepSpec, Trial
from .trial import Asha, replay_rungs, run_trial, trial_result


def _local_worker(trial_id, spec_dict, run_dir, metric, asha, record, lock, threads, parent, results) -> None:
    """One trial in its own process; its result row goes on the `results` queue."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the sweep, which stops its trials itself
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked since its start: a pending one is dropped
    parallel.use(threads)
    rule = None
    if asha is not None:
        spec_asha, max_epochs, mode = asha
        rule = Asha(spec_asha, max_epochs, mode, record, lock).keep_going
    results.put((trial_id, run_trial(spec_dict, run_dir, metric, rule, parent=parent)))


def _died(exitcode: int | None) -> str:
    """What a trial process's exit code says about how it ended without a result."""
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.Signals._value2member_map_ else -exitcode
        hint = " (the kernel's out-of-memory killer sends SIGKILL)" if exitcode == -signal.SIGKILL else ""
        return f"its process was killed by {name}{hint}"
    return f"its process ended with exit code {exitcode} and no result"


def run_local(sweep: SweepSpec, trials: list[Trial], specs: dict, sweep_dir: Path, results: dict,
              on_update=None) -> None:
    """Trials in processes of their own on this machine, `max_concurrent` at a time, `blas_threads` threads
    each. A trial whose process dies (the out-of-memory killer, a signal) fails alone, named with its cause;
    the others go on. Ctrl-C or SIGTERM to the sweep stops every trial (their last checkpoints stay)."""
    from multiprocessing.connection import wait

    ex = sweep.executor
    mode = resolve_mode(sweep.metric, sweep.mode)
    ctx = multiprocessing.get_context("spawn")
    manager = ctx.Manager() if sweep.scheduler else None
    record = manager.dict() if manager else None
    lock = manager.Lock() if manager else None
    for t in trials:  # the rungs hold the metrics that finished trials reached there
        if t.id in results and sweep.scheduler:
            replay_rungs(sweep, specs[t.id], sweep_dir / "trials" / t.id, record)
    saved = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({k: str(ex.blas_threads) for k in saved})  # for the spawned workers (numpy is loaded here)
    queue = ctx.Queue()
    pending = [t for t in trials if t.id not in results]
    running: dict[str, multiprocessing.process.BaseProcess] = {}
    reported: dict[str, dict] = {}

    def finish(tid: str, error: str | None) -> None:
        results[tid] = trial_result(sweep_dir / "trials" / tid, sweep.metric, mode, error)
        write_results(sweep_dir, trials, results, sweep, specs)
        if on_update:
            on_update(tid, results[tid])

    try:
        for t in pending:
            if on_update:
                on_update(t.id, {"status": "queued"})
        while pending or running:
            while pending and len(running) < ex.max_concurrent:
                t = pending.pop(0)
                asha = (sweep.scheduler, specs[t.id]["train"]["epochs"], mode) if sweep.scheduler else None
                proc = ctx.Process(target=_local_worker, name=f"cnnctl-{t.id}", daemon=True, args=(
                    t.id, specs[t.id], str(sweep_dir / "trials" / t.id), sweep.metric, asha, record, lock,
                    ex.blas_threads, os.getpid(), queue))
                # SIGINT blocked while the worker starts: a Ctrl-C that reaches it before _local_worker ignores it
                # (while Python starts and imports) waits, then is dropped; the sweep gets its own once unblocked
                before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                try:
                    proc.start()
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, before)
                running[t.id] = proc
            wait([p.sentinel for p in running.values()], timeout=1.0)
            for tid, proc in list(running.items()):
                if proc.is_alive():
                    continue
                proc.join()
                del running[tid]
                while proc.exitcode == 0 and tid not in reported:  # sent before the process ended
                    try:
                        done_id, res = queue.get(timeout=10)
                    except Empty:
                        break
                    reported[done_id] = res
                res = reported.pop(tid, None)
                finish(tid, res.get("error") if res else _died(proc.exitcode))
    finally:  # Ctrl-C, SIGTERM or an error here: no trial outlives the sweep
        for proc in running.values():
            proc.terminate()
        for proc in running.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if manager:
            manager.shutdown()
