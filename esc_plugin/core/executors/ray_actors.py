"""``QuantConfig(executor="ray", workers=N)``: CMA-ES candidates evaluated on Ray actors.

At the start of the search the calibration context's evaluator (the
quantized copy, its quantization plan and the objective, which holds the
forward loop) is put in Ray's object store once (cloudpickle, as Ray does)
and each of the ``workers`` actors deserialises it once; afterwards a
candidate travels as its amax vector and comes back as its loss. Actors
take groups of ``batch_candidates`` candidates as they become free; the
losses are told to CMA-ES in candidate order, so the scales do not depend on
the number of workers or on which worker evaluated what.

* ``ray.init()`` is called only when no Ray runtime is up in this process, so
  ``RAY_ADDRESS``, a ``ray start --head`` cluster on this machine, or a
  ``ray.init(...)`` of the caller's own are used as Ray users expect; a
  runtime started here is shut down at the end of the search. Every node
  needs esc_plugin installed (the actors import it).
* In a runtime the caller started, the actors stay up after the search
  (without its model) and the next search in this process reuses them, which
  saves their start-up (importing torch); ``ray.shutdown()`` or
  :func:`release_workers` ends them.
* Each actor keeps freed heap memory in its process
  (:func:`~esc_plugin.core.allocator.keep_freed_memory`), so its evaluations
  do not page-fault the activation buffers back in every time.
* Each actor reserves one CPU and ``num_gpus_per_worker`` GPUs (1: one
  actor per GPU; Ray sets its ``CUDA_VISIBLE_DEVICES``, so a model on
  ``cuda:0`` runs on the actor's own GPU).
* An actor that dies (its process killed, its node lost) costs only the
  candidates it was evaluating: they are evaluated again on another actor,
  and a replacement actor is started.
* An objective that raises on an actor raises the same
  :class:`~esc_plugin.core.errors.ObjectiveError` in the driver as in a
  serial run, naming the same evaluation.
"""
import os
import traceback

from ..errors import CalibrationError, ConfigError, QuantizationError
from . import register_executor
from .evaluation import evaluate_group

INSTALL_HINT = 'pip install -e ".[ray]"'


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"executor='ray' needs Ray: {INSTALL_HINT} (or executor='serial').") from exc
    return ray


def check_picklable(**parts):
    """Before any work: the objective and forward loop must travel to the actors (cloudpickle)."""
    ray = import_ray()
    for name, part in parts.items():
        if part is None:
            continue
        try:
            ray.cloudpickle.dumps(part)
        except Exception as exc:
            raise _not_picklable(exc, **{name: part}) from exc


def _not_picklable(exc, **parts):
    import io

    from ray.util import inspect_serializability

    found = set()
    for name, part in parts.items():
        ok, failures = inspect_serializability(part, name=name, print_file=io.StringIO())
        found |= {f"{name}: {f}" for f in failures} if not ok else set()
    return ConfigError(
        "executor='ray' sends the quantized model, the forward loop and the objective to the actors with "
        f"cloudpickle, and they cannot be pickled ({type(exc).__name__}: {exc}; "
        f"{'; '.join(sorted(found)) or 'see above'}). Make the objective a function or object that holds only "
        "picklable data (tensors, models, plain containers; rebuild handles such as files, loggers, locks or "
        "dataloaders inside it on first use), or use executor='serial'.")


class EvaluationWorker:
    """A Ray actor holding one copy of a search's evaluator; evaluates groups of candidates."""

    def __init__(self):
        import torch

        from ..allocator import keep_freed_memory

        torch.set_grad_enabled(False)
        self.evaluator = None
        self.keeps_freed_memory = keep_freed_memory()  # the actor's own process: see core/allocator.py

    def allocator(self):
        """Whether this actor's process keeps freed memory (:func:`~esc_plugin.core.allocator.keep_freed_memory`)."""
        return self.keeps_freed_memory

    def load(self, evaluator):
        """This search's evaluator (the quantized copy, plan and objective), deserialised once."""
        self.evaluator = evaluator
        return os.getpid()

    def unload(self):
        self.evaluator = None

    def pid(self):
        return os.getpid()

    def evaluate(self, index, amaxes, check):
        try:
            return "ok", evaluate_group(self.evaluator, index, amaxes, check=check)
        except (QuantizationError, ConfigError) as exc:  # ObjectiveError, BatchingError, ...: re-raised by the driver
            return "error", exc, traceback.format_exc()


@register_executor("ray", summary="Ray actors (QuantConfig(workers=N, num_gpus_per_worker=g))")
class RayExecutor:
    def __init__(self, ctx):
        ray = self.ray = import_ray()
        cfg = ctx.config
        self.evaluator, self.batch, self.workers = ctx.evaluator, cfg.batch_candidates, cfg.workers
        self.gpus = float(cfg.num_gpus_per_worker)
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            ray.init()  # RAY_ADDRESS, a `ray start` cluster on this machine, else a local runtime
        self.actors, self.replacements, self.checked = [], 0, False
        try:
            self._check_resources()
            self.payload = self._put(ctx.evaluator)
            reused = _take_idle(ray, self.gpus, self.workers)
            self.actors = reused + [self._new_actor() for _ in range(self.workers - len(reused))]
            ray.get([a.load.remote(self.payload) for a in self.actors])  # fail here if an actor cannot start
        except BaseException:
            self.close(keep=False)
            raise

    # ------------------------------------------------------------------ start
    def _check_resources(self):
        have = self.ray.cluster_resources()
        need = {"CPU": self.workers, "GPU": self.workers * self.gpus}
        for kind, amount in need.items():
            if amount and have.get(kind, 0) < amount:
                raise ConfigError(
                    f"executor='ray' with workers={self.workers} and num_gpus_per_worker={self.gpus} needs "
                    f"{amount:g} {kind}s in the Ray cluster, which has {have.get(kind, 0):g}: lower workers / "
                    "num_gpus_per_worker, or add nodes (ray start --address=...).")

    def _put(self, evaluator):
        try:
            return self.ray.put(evaluator)
        except Exception as exc:
            raise _not_picklable(exc, objective=evaluator.objective, model=evaluator.qmodel) from exc

    def _new_actor(self):
        cls = self.ray.remote(EvaluationWorker).options(num_cpus=1, num_gpus=self.gpus, max_restarts=0)
        return cls.remote()

    def worker_pids(self):
        """Process ids of the live actors (for monitoring; the tests kill one)."""
        return self.ray.get([a.pid.remote() for a in self.actors])

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, candidates, progress=None):
        ray, base = self.ray, self.evaluator.count
        starts = list(range(0, len(candidates), self.batch))
        queue, results, errors = list(starts), {}, {}
        in_flight, idle = {}, list(self.actors)
        while queue or in_flight:
            while queue and idle and not (errors and queue[0] > min(errors)):
                start, actor = queue.pop(0), idle.pop(0)
                check = self.batch > 1 and not self.checked
                self.checked |= check
                ref = actor.evaluate.remote(base + start, candidates[start:start + self.batch], check)
                in_flight[ref] = (actor, start, check)
            if not in_flight:
                break
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            actor, start, check = in_flight.pop(ref)
            try:
                answer = ray.get(ref)
            except ray.exceptions.RayActorError:
                self._replace(actor, idle)
                queue.insert(0, start)
                self.checked &= not check
                continue
            except ray.exceptions.RayTaskError as exc:
                raise exc.as_instanceof_cause() from None
            idle.append(actor)
            if answer[0] == "error":
                errors[start] = answer[1:]
                continue
            results[start] = answer[1]
            if progress is not None:
                progress(len(answer[1]))
        if errors:
            exc, worker_traceback = errors[min(errors)]
            exc.add_note(f"raised on a Ray actor:\n{worker_traceback}")
            raise exc
        out = [e for start in starts for e in results[start]]
        for e in out:  # the driver's evaluator counts them as if it had run them
            ev = self.evaluator
            ev.count, ev.seconds, ev.n_nonfinite = ev.count + 1, ev.seconds + e.seconds, ev.n_nonfinite + e.nonfinite
            ev.last_selection = e.selection
        return out

    def _replace(self, dead, idle):
        """Drop a dead actor and start another (bounded, so a worker that always dies ends the run)."""
        self.actors = [a for a in self.actors if a is not dead]
        self.replacements += 1
        if self.replacements > 2 * self.workers + 2:
            raise CalibrationError(
                f"executor='ray': {self.replacements} actors died during the search (killed, out of memory, or a "
                "lost node): check the Ray dashboard / logs (ray status), or use executor='serial'.")
        actor = self._new_actor()
        actor.load.remote(self.payload)  # queued before its first group
        self.actors.append(actor)
        idle.append(actor)

    def close(self, keep=True):
        """End the search: actors go back to the idle pool (caller's runtime) or are ended."""
        ray, actors, self.actors = self.ray, self.actors, []
        if not ray.is_initialized():
            return
        if keep and not self.started_ray:
            for actor in actors:
                actor.unload.remote()
            _IDLE.setdefault(_session(ray), []).extend((self.gpus, a) for a in actors)
            return
        for actor in actors:
            _kill(ray, actor)
        if self.started_ray:
            ray.shutdown()


# Idle actors per Ray session (job id), with their GPU reservation: reused by the next search.
_IDLE = {}


def _session(ray):
    return ray.get_runtime_context().get_job_id()


def _take_idle(ray, gpus, n):
    """Up to ``n`` idle actors with this GPU reservation that are still alive; the others are ended
    (they would hold resources the new actors need)."""
    pool = _IDLE.pop(_session(ray), [])
    take = [a for g, a in pool if g == gpus][:n]
    for _, actor in pool:
        if not any(actor is t for t in take):
            _kill(ray, actor)
    alive = []
    for actor in take:
        try:
            ray.get(actor.pid.remote(), timeout=60)
            alive.append(actor)
        except Exception:  # died while idle
            _kill(ray, actor)
    return alive


def release_workers():
    """End the idle actors kept for reuse in this process's Ray session (frees their CPUs / GPUs)."""
    import ray

    if ray.is_initialized():
        for _, actor in _IDLE.pop(_session(ray), []):
            _kill(ray, actor)
    _IDLE.clear()


def _kill(ray, actor):
    try:
        ray.kill(actor)
    except Exception:  # already dead
        pass
