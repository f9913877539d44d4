"""Training-step timing shared by the benchmarks: steps of several models
timed in rotation in one process, so that the machine's drift hits them alike."""

import statistics
import time


def scheduled_step(model, gamma, lam, steps):
    """One `train_on_batch` step function of a compiled gated `model`, with
    `GateLossScheduler(gamma, lam)`'s per-batch work, as `fit` would run it."""
    import bs_keras

    callback = bs_keras.GateLossScheduler(gamma, lam)
    callback.set_model(model)
    callback.set_params({"steps": steps, "epochs": 1})
    callback.on_train_begin()
    callback.on_epoch_begin(0)

    def step(i, x, y):
        callback.on_train_batch_begin(i)
        logs = model.train_on_batch(x, y, return_dict=True)
        callback.on_train_batch_end(i, logs)

    return step


def median_step_ms(steps, x, y, warmup, timed):
    """Median wall time (ms) of each `steps[name](i, x, y)` over `timed`
    rounds after `warmup` untimed ones, the order rotating every round."""
    for i in range(warmup):
        for step in steps.values():
            step(i, x, y)
    times = {k: [] for k in steps}
    names = list(steps)
    for i in range(timed):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            steps[name](warmup + i, x, y)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}
