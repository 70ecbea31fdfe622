"""The speed work, apart from the algorithm: compile and CUDA graphs, and the CPU strategies.

- :func:`accelerate` / :class:`AcceleratedFunction` (:mod:`.compile`): ``torch.compile`` and
  CUDA graphs for any function of tensors and TensorDicts, with eager's results.
- :class:`SpeedOptions` (:mod:`.options`): the CPU strategies a loss runs with, one explicit object:
  ensemble row chunks (:mod:`.chunks`), the Q target on ~``B / N`` rows (:mod:`.rows`), and the
  compiled behavior step (:mod:`.behavior`, used by :class:`~torchrl_bdpo.training.BDPOUpdate`).

Every path gives the numbers of the plain one up to float rounding; docs/performance.md says
what each buys, on which device. The losses in :mod:`torchrl_bdpo.objectives` hold the math,
with one eager and one static (compiled or captured) path each.
"""

from torchrl_bdpo.speed.compile import AcceleratedFunction, accelerate, input_signature
from torchrl_bdpo.speed.options import SpeedOptions

__all__ = ["AcceleratedFunction", "SpeedOptions", "accelerate", "input_signature"]
