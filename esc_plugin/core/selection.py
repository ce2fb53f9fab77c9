"""ESC step 3: which of the search's results becomes the final scales.

The paper takes the mean of the final search distribution. The search only
sees the objective on the calibration samples, so the mean can score worse
than where it started; with ``keep_init_if_worse`` the candidates (search
mean first, then the start point) are compared on the objective and the best
is kept, ties going to the earlier candidate (the paper's choice).
"""
import numpy as np


def choose(candidates, keep_best=True):
    """Pick one of ``[(name, amax, score), ...]`` (the first is the paper's choice).

    Example
    -------
    >>> import numpy as np
    >>> choose([("mean", np.ones(2), 0.3), ("init", np.zeros(2), 0.2)])[0]
    'init'
    >>> choose([("mean", np.ones(2), 0.3), ("init", np.zeros(2), 0.2)], keep_best=False)[0]
    'mean'
    """
    if not keep_best:
        return candidates[0]
    scores = [np.inf if s is None or not np.isfinite(s) else s for _, _, s in candidates]
    return candidates[int(np.argmin(scores))]
