"""Train one (method, seed) on a task, and all of them in turn.

One step is ``loss = objective(model, x, y); loss.backward(); clip; SGD step``. After each epoch
the model is evaluated on the validation split (dropout off); the weights of the best validation
epoch are evaluated on the test split at the end. ``train_seconds`` counts training steps only
(evaluation is the same for every method), and is what the wall-clock plot uses.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable

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
    val_loss, val_metric = task.evaluate(model, "valid")
    history = [{"epoch": 0, "train_objective": None, "val_loss": val_loss, "val_metric": val_metric,
                "train_seconds": 0.0}]
    best, best_state = {"epoch": None, "val_loss": None, "val_metric": None}, None
    train_seconds, steps, diverged = 0.0, 0, False
    bar = tqdm(total=config.epochs * task.steps_per_epoch, desc=f"{method.name} seed {seed}", unit="step",
               position=position, leave=False, dynamic_ncols=True, disable=None)
    for epoch in range(1, config.epochs + 1):
        tick = time.perf_counter()
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
        if diverged:
            break
        val_loss, val_metric = task.evaluate(model, "valid")
        history.append({"epoch": epoch, "train_objective": total / count, "val_loss": val_loss,
                        "val_metric": val_metric, "train_seconds": train_seconds})
        bar.set_postfix_str(f"epoch {epoch} val {task.metric} {val_metric:.2f}")
        if _better(task, val_metric, best["val_metric"]):
            best = {"epoch": epoch, "val_loss": val_loss, "val_metric": val_metric}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bar.close()
    test_loss = test_metric = None
    if best_state is not None:
        model.load_state_dict(best_state)
        test_loss, test_metric = task.evaluate(model, "test")
    return {
        "method": method.name, "seed": seed, "history": history, "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"], "best_val_metric": best["val_metric"], "test_loss": test_loss,
        "test_metric": test_metric, "steps": steps, "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started, "diverged": diverged,
    }


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


def train_all(make_task: Callable, methods: list, seeds: tuple, jobs: int = 1, threads: int = 0) -> list:
    """Every method with every seed; returns the runs seed-major in ``methods`` order.

    ``jobs == 1``: one after another in this process. ``jobs > 1``: in that many worker processes
    with ``threads`` torch threads each (one each is fastest on a small CPU: a step is mostly small
    ops, and two threads per op fight over two cores); the longest runs start first. ``make_task()``
    builds the task (it must be picklable when ``jobs > 1``). One progress bar over the runs, one
    per busy process over the steps of its run, one summary line per finished run.
    """
    order = [(m.name, seed) for seed in seeds for m in methods]
    by_name = {m.name: m for m in methods}
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked OpenMP or CUDA state
    if jobs > 1:
        tqdm.set_lock(context.RLock())  # the bars of all processes share one lock
    outer = tqdm(total=len(order), desc="runs", unit="run", position=0, dynamic_ncols=True, disable=None)
    runs = {}
    if jobs == 1:
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads or previous_threads)
        try:
            task = make_task()
            for name, seed in order:
                run = runs[name, seed] = train_run(task, by_name[name], seed)
                outer.update(1)
                tqdm.write(_summary_line(run))
        finally:
            torch.set_num_threads(previous_threads)
    else:
        slots = context.Queue()
        for slot in range(1, jobs + 1):
            slots.put(slot)
        longest_first = sorted(order, key=lambda job: -by_name[job[0]].cost)
        init_args = (make_task, threads or 1, slots, tqdm.get_lock())
        with ProcessPoolExecutor(jobs, context, _init_worker, init_args) as pool:
            for future in as_completed([pool.submit(_run_in_worker, job) for job in longest_first]):
                run = future.result()
                runs[run["method"], run["seed"]] = run
                outer.update(1)
                tqdm.write(_summary_line(run))
    outer.close()
    return [runs[job] for job in order]
