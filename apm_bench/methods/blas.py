"""One BLAS thread for the small classifiers methods fit (routing's, C-BPO's positive prior).

Their matrices are a few hundred rows by 384 columns. OpenBLAS splits even those across threads,
which then spin waiting for work: a routing fit of the default run took 0.27 s with them and
0.024 s without, and the spinning threads took the cores from φ's encoder running beside it. The
limit is entered after scikit-learn is imported, so it covers the BLAS that SciPy loads too.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any


def one_blas_thread() -> AbstractContextManager[Any]:
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")
