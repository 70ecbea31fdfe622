"""``torch.compile`` and CUDA graphs for BDPO's hot paths, with the same results as eager.

:func:`accelerate` wraps a function of tensors / TensorDicts:

- ``compile=True``: :func:`torch.compile` (``mode``, ``backend`` passed through). The first
  call runs eagerly: it builds what the losses create lazily, which torch 2.13's dynamo
  would otherwise trip over (``NameError: SYNTHETIC_LOCAL``).
- ``cudagraphs=True``: :class:`tensordict.nn.CudaGraphModule`, one captured graph per input
  signature (shapes, dtypes, devices, TensorDict keys). A batch of a new size is
  captured anew (up to ``max_graphs`` signatures, then a ``RuntimeError``): a replay never
  reads a batch of another shape into buffers sized for the old one.
  Requires CUDA; without it a ``RuntimeError`` says so (use ``compile=True`` on CPU).

Captured code must not synchronise with the host: the losses switch to their static
paths (no terminal-row skipping, no finiteness checks) while a graph is being captured,
so validate the data before it reaches a graphed update (the offline buffers do).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch
from tensordict import is_tensor_collection

__all__ = ["accelerate", "AcceleratedFunction", "input_signature"]


def input_signature(args: tuple, kwargs: dict | None = None) -> tuple:
    """A hashable description of the tensors (shape, dtype, device) and constants of a call."""

    def sig(x):
        if isinstance(x, torch.Tensor):
            return ("T", tuple(x.shape), x.dtype, str(x.device))
        if is_tensor_collection(x):
            leaves = x.items(include_nested=True, leaves_only=True)
            return ("TD", tuple(x.batch_size), tuple(sorted((str(k), tuple(v.shape), v.dtype, str(v.device)) for k, v in leaves)))
        if isinstance(x, (tuple, list)):
            return tuple(sig(y) for y in x)
        if isinstance(x, dict):
            return tuple(sorted((k, sig(v)) for k, v in x.items()))
        try:
            hash(x)
        except TypeError as err:
            raise TypeError(
                f"accelerate: argument of type {type(x).__name__} is neither a tensor, a TensorDict "
                f"nor a hashable constant; pass tensors or TensorDicts to an accelerated function."
            ) from err
        return ("C", x)

    return (sig(tuple(args)), sig(kwargs or {}))


def _devices(args, kwargs) -> set[str]:
    out = set()

    def visit(x):
        if isinstance(x, torch.Tensor):
            out.add(x.device.type)
        elif is_tensor_collection(x):
            for v in x.values(include_nested=True, leaves_only=True):
                out.add(v.device.type)
        elif isinstance(x, (tuple, list)):
            for y in x:
                visit(y)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y)

    visit(args)
    visit(kwargs)
    return out


class AcceleratedFunction:
    """A function run eagerly, compiled, CUDA-graphed, or compiled and graphed. See :func:`accelerate`.

    Keyword Args:
        compile (bool): ``torch.compile`` it (first call eager). Defaults to ``False``.
        mode, backend, dynamic: passed to ``torch.compile`` (``dynamic=None``: torch's default;
            always ``False`` with ``cudagraphs``).
        cudagraphs (bool): capture it in a CUDA graph per input signature, after ``warmup``
            eager calls each (every call, warm-up or replay, runs ``fn`` once). CUDA only.
        warmup (int): eager calls before capture, per signature. Defaults to 2.
        max_graphs (int): how many signatures may be captured. Defaults to 8.
        name (str): used in error messages.
    """

    def __init__(
        self,
        fn: Callable,
        *,
        compile: bool = False,
        mode: str | None = None,
        backend: str | Callable | None = None,
        dynamic: bool | None = None,
        cudagraphs: bool = False,
        warmup: int = 2,
        max_graphs: int = 8,
        name: str | None = None,
    ) -> None:
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        if cudagraphs and not torch.cuda.is_available():
            raise RuntimeError(
                f"{self.name}: cudagraphs=True needs a CUDA device, and torch.cuda.is_available() "
                f"is False on this machine. Set cudagraphs=False (compile=True also speeds up CPU "
                f"runs), or run on a GPU."
            )
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup={warmup!r}: expected an integer >= 1 (eager calls before capture).")
        if compile and cudagraphs and warmup < 2:
            raise ValueError(
                f"warmup={warmup}: compile=True with cudagraphs=True needs warmup >= 2, so that "
                f"compilation happens in a warm-up call and never during the capture."
            )
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs={max_graphs!r}: expected an integer >= 1.")
        self.eager = fn
        self.compile = compile
        self.cudagraphs = cudagraphs
        self.warmup = warmup
        self.max_graphs = max_graphs
        kwargs = {}
        if mode is not None:
            kwargs["mode"] = mode
        if backend is not None:
            kwargs["backend"] = backend
        if dynamic is not None:
            kwargs["dynamic"] = dynamic
        if cudagraphs:
            # one graph per input signature anyway: specialise the kernels to each shape too
            kwargs["dynamic"] = False
        self._fn = torch.compile(fn, **kwargs) if compile else fn
        self._graphs: dict[tuple, Any] = {}
        self.calls = 0
        self._eager_done = False
        functools.update_wrapper(self, fn, updated=())

    @property
    def num_graphs(self) -> int:
        """How many input signatures have a CUDA graph (0 unless ``cudagraphs=True``)."""
        return len(self._graphs)

    def _run(self, *args, **kwargs):
        # the very first call runs eagerly (inside a CUDA-graph warm-up when graphed)
        if self.compile and not self._eager_done:
            self._eager_done = True
            return self.eager(*args, **kwargs)
        return self._fn(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if not self.cudagraphs:
            return self._run(*args, **kwargs)
        devices = _devices(args, kwargs)
        if devices - {"cuda"}:
            raise RuntimeError(
                f"{self.name}: cudagraphs=True, but the inputs live on {sorted(devices)}; expected "
                f"CUDA tensors only. Move the batch (and the module) to the GPU first."
            )
        key = input_signature(args, kwargs)
        graph = self._graphs.get(key)
        if graph is None:
            if len(self._graphs) >= self.max_graphs:
                raise RuntimeError(
                    f"{self.name}: {len(self._graphs)} CUDA graphs captured already (max_graphs="
                    f"{self.max_graphs}) and this call brings a new input signature {key}. Keep the "
                    f"batch size fixed (e.g. drop_last batches), raise max_graphs, or use cudagraphs=False."
                )
            from tensordict.nn import CudaGraphModule

            graph = CudaGraphModule(self._run, warmup=self.warmup)
            self._graphs[key] = graph
        return graph(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, compile={self.compile}, cudagraphs={self.cudagraphs}, graphs={self.num_graphs})"


def accelerate(fn: Callable, **options) -> Callable:
    """Wrap ``fn`` with ``torch.compile`` and/or CUDA graphs; return ``fn`` itself when both are off.

    Args:
        fn: a function of tensors and TensorDicts (other arguments must be hashable constants).

    Keyword Args:
        **options: those of :class:`AcceleratedFunction` (checked here, on or off).

    Examples:
        >>> import torch
        >>> from torchrl_bdpo.speed import accelerate
        >>> f = accelerate(lambda x: x.sin() * 2, compile=True, backend="eager")
        >>> x = torch.randn(3)
        >>> torch.equal(f(x), x.sin() * 2) and torch.equal(f(x), x.sin() * 2)
        True
    """
    inspect.signature(AcceleratedFunction).bind(fn, **options)  # an unknown option: a TypeError naming it
    if not options.get("compile", False) and not options.get("cudagraphs", False):
        return fn
    return AcceleratedFunction(fn, **options)
