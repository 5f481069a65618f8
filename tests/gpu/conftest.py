"""GPU tests share one CUDA context per pytest process. A kernel fault (an illegal address, a failed graph
capture left open) poisons that context: every later CUDA call in the process raises, so one broken test
shows as a dozen RuntimeErrors in unrelated tests (seen once, issue 14: 12 of 23 failed after a run of
benchmark processes). After each test this checks that the device still synchronises; once it does not,
the remaining tests fail at once with the name and error of the test that poisoned the context, instead of
with errors of their own."""

import pytest
import torch

_BROKEN = pytest.StashKey[dict]()  # which test broke the CUDA context, kept in the pytest run's stash


@pytest.fixture(autouse=True)
def _cuda_context_guard(request):
    if not torch.cuda.is_available():
        yield
        return
    broken = request.config.stash.setdefault(_BROKEN, {})
    if broken:
        pytest.fail(f"CUDA context already broken by {broken['test']}: {broken['error']} "
                    "(this test did not run; rerun it alone)", pytrace=False)
    yield
    try:
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - any failure to synchronise means the context is unusable
        broken.update(test=request.node.nodeid, error=f"{type(e).__name__}: {str(e).splitlines()[0]}")
        raise
