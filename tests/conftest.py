import os
import sys

import torch

# tests/workers.py is a helper module, imported as `workers` by the test files.
sys.path.insert(0, os.path.dirname(__file__))

# The first optimizer step in a process imports torch._dynamo (seconds on a busy
# machine). Do it once here, before any test forks workers, so children inherit it.
_warm = torch.nn.Parameter(torch.zeros(1))
_warm.grad = torch.zeros(1)
torch.optim.SGD([_warm], lr=0.1, momentum=0.9).step()
torch.optim.Adam([_warm], lr=0.1).step()
