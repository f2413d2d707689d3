"""Replay whole DiT forwards as CUDA graphs.

A sparse-attention DiT step launches thousands of small kernels (norms, RoPE, mask building, the
sparse kernels); captured once per input shape and attention setting, a forward costs one graph
launch and no Python. The first call of each key runs the model eagerly (which also compiles and
autotunes the Triton kernels), then captures it; later calls copy their inputs into the captured
buffers and replay. A forward that cannot be captured falls back to eager for that key, with a
warning, so a capture problem costs speed, never a request.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

import torch

from turbo_kernels.registry import AttentionMetadata

logger = logging.getLogger(__name__)

MAX_GRAPHS = 4
"""Captured graphs kept per model (each holds its own activation memory); least recently used go."""


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    timestep: torch.Tensor
    context: torch.Tensor
    out: torch.Tensor


class GraphedForward:
    """Callable with the DiT forward's signature that replays captured graphs on CUDA."""

    def __init__(self, model: torch.nn.Module, warmup_runs: int = 1) -> None:
        self.model = model
        self.warmup_runs = warmup_runs
        self._graphs: OrderedDict[Hashable, _Captured | None] = OrderedDict()
        self._lock = threading.Lock()
        """Replays share static buffers: concurrent callers (threads of one replica) take turns."""

    def __call__(
        self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, attention: AttentionMetadata
    ) -> torch.Tensor:
        if x.device.type != "cuda":
            return self.model(x, timestep, context, attention)
        key = (tuple(x.shape), x.dtype, tuple(context.shape), context.dtype, attention)
        with self._lock:
            return self._replay(key, x, timestep, context, attention)

    def _replay(self, key: Hashable, x, timestep, context, attention) -> torch.Tensor:
        if key not in self._graphs:
            self._graphs[key] = self._capture(x, timestep, context, attention)
            while len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        captured = self._graphs[key]
        if captured is None:
            return self.model(x, timestep, context, attention)
        captured.x.copy_(x)
        captured.timestep.copy_(timestep)
        captured.context.copy_(context)
        captured.graph.replay()
        return captured.out.clone()

    def _capture(
        self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, attention: AttentionMetadata
    ) -> _Captured | None:
        static = [t.clone() for t in (x, timestep, context)]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture stream, as PyTorch asks
                for _ in range(self.warmup_runs):
                    self.model(*static, attention)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.model(*static, attention)
        except Exception as error:  # noqa: BLE001 - capture is an optimisation; eager still works
            logger.warning("CUDA graph capture failed for %s (%s); running this shape eagerly", tuple(x.shape), error)
            torch.cuda.synchronize()
            return None
        return _Captured(graph, *static, out)
