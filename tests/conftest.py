import os

# One intra-op thread per test process (and for the subprocesses the tests start): the tests use
# tiny models, where OpenMP threads only add overhead, and oversubscribed cores make them crawl.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import matplotlib  # noqa: E402
import torch  # noqa: E402

matplotlib.use("Agg")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
