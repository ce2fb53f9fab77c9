"""The default executor: every candidate evaluated in this process, in order."""
from . import register_executor
from .evaluation import evaluate_group


@register_executor("serial", summary="in this process, one group after the other (default)")
class SerialExecutor:
    """Evaluates groups of ``batch_candidates`` on the calibration context's own evaluator."""

    def __init__(self, ctx):
        self.evaluator = ctx.evaluator
        self.batch = ctx.config.batch_candidates
        self.checked = False

    def evaluate(self, candidates, progress=None):
        """Evaluations of ``candidates`` in order; ``progress(n)`` after each group."""
        out = []
        for start in range(0, len(candidates), self.batch):
            group = candidates[start:start + self.batch]
            check = len(group) > 1 and not self.checked
            out += evaluate_group(self.evaluator, self.evaluator.count, group, check=check)
            self.checked |= check
            if progress is not None:
                progress(len(group))
        return out

    def close(self):
        pass
