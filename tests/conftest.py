import os

import torch

# one thread per test worker (see Makefile); set before any test builds a model
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
