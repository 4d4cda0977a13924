"""Train one (method, seed) on a task, and all of them in turn.

One step is ``loss = objective(model, x, y); loss.backward(); clip; SGD step``. After each epoch
the model is evaluated on the validation and the test split (dropout off); a run's test result is
the test metric of its best validation epoch (the curves show every epoch's). ``train_seconds``
counts training steps only (evaluation is the same for every method), and is what the wall-clock
plot used; ``train_cpu_seconds`` is the process CPU time of the same steps, which a busy neighbour
on the machine inflates less than wall-clock, and which the report compares with the CPU time of a
dropout step measured in the same sitting (:func:`calibrate`).
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Optional

import torch
from tqdm import tqdm

from .methods import Method, make_methods


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _better(task, new: float, old) -> bool:
    if not math.isfinite(new):
        return False
    return old is None or (new > old if task.higher_is_better else new < old)


def train_run(task, method: Method, seed: int, position: int = 1) -> dict:
    """Train ``method`` on ``task`` from the seed-``seed`` initialization; return every number of the run.

    ``history`` has one entry per epoch, starting with epoch 0 (the initial model, not a candidate
    for the best epoch). A run whose training objective becomes non-finite stops there and is
    marked ``diverged``.
    """
    config = task.config
    torch.manual_seed(seed)
    model = task.build_model()
    model.train()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    started = time.perf_counter()

    def evaluated(epoch: int, train_objective) -> dict:
        (val_loss, val_metric), (test_loss, test_metric) = task.evaluate(model, "valid"), task.evaluate(model, "test")
        return {"epoch": epoch, "train_objective": train_objective, "val_loss": val_loss, "val_metric": val_metric,
                "test_loss": test_loss, "test_metric": test_metric, "train_seconds": train_seconds,
                "train_cpu_seconds": train_cpu_seconds}

    train_seconds = train_cpu_seconds = 0.0
    history = [evaluated(0, None)]
    best = None
    steps, diverged = 0, False
    bar = tqdm(total=config.epochs * task.steps_per_epoch, desc=f"{method.name} seed {seed}", unit="step",
               position=position, leave=False, dynamic_ncols=True, disable=None)
    for epoch in range(1, config.epochs + 1):
        tick, cpu_tick = time.perf_counter(), time.process_time()
        total = 0.0
        count = 0
        for x, y in task.train_batches(model, epoch, seed):
            loss = method.objective(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.clip)
            optimizer.step()
            value = loss.item()
            steps += 1
            bar.update(1)
            if not math.isfinite(value):
                diverged = True
                break
            total += value
            count += 1
        _synchronize(task.device)
        train_seconds += time.perf_counter() - tick
        train_cpu_seconds += time.process_time() - cpu_tick
        if diverged:
            break
        history.append(evaluated(epoch, total / count))
        bar.set_postfix_str(f"epoch {epoch} val {task.metric} {history[-1]['val_metric']:.2f}")
        if _better(task, history[-1]["val_metric"], best and best["val_metric"]):
            best = history[-1]
    bar.close()
    best = best or {}
    return {
        "method": method.name, "seed": seed, "history": history, "best_epoch": best.get("epoch"),
        "best_val_loss": best.get("val_loss"), "best_val_metric": best.get("val_metric"),
        "test_loss": best.get("test_loss"), "test_metric": best.get("test_metric"), "steps": steps,
        "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds,
        "wall_seconds": time.perf_counter() - started, "diverged": diverged,
    }


CALIBRATION_STEPS = 20


def calibrate(task, method: Method, threads: int, steps: int = CALIBRATION_STEPS) -> float:
    """CPU seconds per training step of ``method`` (dropout, the reference every run's CPU time is compared
    with) in this process with ``threads`` torch threads: the median of ``steps`` steps of a fresh
    model after two untimed ones. Runs before any run of the sitting, so it sees the same machine."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = task.build_model()
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=task.config.lr)
        times = []
        epochs = (task.train_batches(model, epoch, 0) for epoch in itertools.count(1))
        for step, (x, y) in enumerate(itertools.islice(itertools.chain.from_iterable(epochs), steps + 2)):
            tick = time.process_time()
            loss = method.objective(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _synchronize(task.device)
            if step >= 2:
                times.append(time.process_time() - tick)
        return statistics.median(times)
    finally:
        torch.set_num_threads(previous_threads)


def _summary_line(run: dict) -> str:
    if run["best_val_metric"] is None:
        best = "diverged before the first evaluation"
    else:
        best = f"best val {run['best_val_metric']:.2f} (epoch {run['best_epoch']}), test {run['test_metric']:.2f}"
    return (f"{run['method']:<18} seed {run['seed']}: {best}; {run['train_seconds']:.1f} s training, "
            f"{run['wall_seconds']:.1f} s with evaluation" + (" [diverged]" if run["diverged"] else ""))


# State of a worker process: its task (data loaded once), the methods by name, its progress-bar row.
_worker: dict = {}


def _init_worker(make_task: Callable, threads: int, slots, lock) -> None:
    torch.set_num_threads(threads)
    tqdm.set_lock(lock)
    task = make_task()
    _worker.update(task=task, position=slots.get(),
                   methods={m.name: m for m in make_methods(task.config.k_values, task.config.k_noise)})


def _run_in_worker(job: tuple) -> dict:
    method_name, seed = job
    return train_run(_worker["task"], _worker["methods"][method_name], seed, position=_worker["position"])


def train_all(make_task: Callable, methods: list, seeds: tuple, jobs: int = 1, threads: int = 0,
              finished: Optional[dict] = None, on_run: Optional[Callable] = None, longest_first: bool = True) -> list:
    """Every method with every seed; returns the runs seed-major in ``methods`` order.

    ``finished`` maps (method, seed) to runs already done (a resumed command): those are not trained
    again. ``on_run(runs)`` is called after every run that finishes here with every run so far (in
    table order), so that the caller can write them out before the next one ends.

    ``jobs == 1``: one after another in this process. ``jobs > 1``: in that many worker processes
    with ``threads`` torch threads each (one each is fastest on a small CPU: a step is mostly small
    ops, and two threads per op fight over two cores); the longest runs start first (the shortest
    with ``longest_first=False``: a resumable sitting that may be stopped banks finished runs early). ``make_task()``
    builds the task (it must be picklable when ``jobs > 1``). One progress bar over the runs (its ETA
    counts runs, not their costs), one per busy process over the steps of its run, one summary line
    per finished run.
    """
    order = [(m.name, seed) for seed in seeds for m in methods]
    runs = {job: run for job, run in (finished or {}).items() if job in order}
    todo = [job for job in order if job not in runs]
    by_name = {m.name: m for m in methods}
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked OpenMP or CUDA state
    if jobs > 1:
        tqdm.set_lock(context.RLock())  # the bars of all processes share one lock
    outer = tqdm(total=len(order), initial=len(runs), desc="runs", unit="run", position=0, dynamic_ncols=True,
                 disable=None)

    def record(run: dict) -> None:
        runs[run["method"], run["seed"]] = run
        outer.update(1)
        tqdm.write(_summary_line(run))
        if on_run is not None:
            on_run([runs[job] for job in order if job in runs])

    if todo and jobs == 1:
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads or previous_threads)
        try:
            task = make_task()
            for name, seed in todo:
                record(train_run(task, by_name[name], seed))
        finally:
            torch.set_num_threads(previous_threads)
    elif todo:
        slots = context.Queue()
        for slot in range(1, jobs + 1):
            slots.put(slot)
        ordered = sorted(todo, key=lambda job: -by_name[job[0]].cost if longest_first else by_name[job[0]].cost)
        init_args = (make_task, threads or 1, slots, tqdm.get_lock())
        with ProcessPoolExecutor(jobs, context, _init_worker, init_args) as pool:
            for future in as_completed([pool.submit(_run_in_worker, job) for job in ordered]):
                record(future.result())
    outer.close()
    return [runs[job] for job in order]
