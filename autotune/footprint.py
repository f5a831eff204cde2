"""What an export configuration weighs and holds in memory, measured once on the base model.

Size on disk and the memory of the process that runs a model follow from its export
configuration, the model and the hardware, not from the adapter merged into it: rank, alpha
and learning rate change the weights' values, not their shapes. So the search measures them
once per configuration, on the base model exported that way, and screens with them: under
``--max-size`` or ``--max-memory`` an export whose configuration alone breaks the bound is
never built (nor an adapter trained for it), and adapters are screened at the most accurate
precision whose configuration fits (:meth:`autotune.search.Search.run`). What is measured as
itself afterwards is the candidate (trials and the re-benchmark measure every figure again).
Latency is not screened this way: it also follows the answers a model gives and the machine's
load, and a margin wide enough for both would screen nothing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from autotune import cache
from autotune.bounds import KINDS, Bounds, memory_of
from autotune.cache import atomic_write_text, content_key, folder_size
from autotune.candidate import MEASURE_LIBRARIES, CandidateSpec, Workspace, build
from autotune.export import ExportSpec
from autotune.measure import MEASURE_VERSION, measure

MEMORY_PROMPTS = 4  # requests run to read a configuration's peak memory (it is reached by the first)


@dataclass(frozen=True)
class Footprint:
    """An export configuration's size on disk, and the peak memory of running it (None: not measured)."""

    size_mb: float
    memory_mb: float | None = None

    def over(self, bounds: Bounds) -> list[str]:
        """One phrase per size or memory bound this configuration alone breaks."""
        figures = {"max_size_mb": (self.size_mb, "size"), "max_memory_mb": (self.memory_mb, "memory")}
        over = []
        for kind in KINDS:
            limit = getattr(bounds, kind.key)
            if kind.key in figures and limit is not None and figures[kind.key][0] is not None \
                    and figures[kind.key][0] > limit:
                over.append(f"{figures[kind.key][1]} {kind.format(figures[kind.key][0])} > {kind.flag} {limit:g}")
        return over


def configuration(export: ExportSpec) -> ExportSpec:
    """The export whose footprint ``export`` has: a calibrated int4 export writes its own weights in the
    layout of the same rounding without calibration."""
    return dataclasses.replace(export, calibration="none").normalized()


def footprint(ws: Workspace, export: ExportSpec, with_memory: bool) -> Footprint:
    """The footprint of ``export``'s configuration, measured on the base model (cached in the workspace)."""
    spec = CandidateSpec(None, configuration(export))
    model_dir = build(ws, spec)
    size = folder_size(model_dir) / 2**20
    if not with_memory:
        return Footprint(size)
    prompts, answers = ws.prompts("validation")
    key = content_key("footprint", cache.SCHEMA_VERSION, MEASURE_VERSION, cache.library_versions(*MEASURE_LIBRARIES),
                      ws.export_key(spec), ws.threads or 1, ws.device)  # memory is the device's: in the key
    path = ws.root / "footprints" / f"{key}.json"
    if not path.is_file():
        measured = measure(model_dir, prompts[:MEMORY_PROMPTS], answers[:MEMORY_PROMPTS], ws.splits.labels,
                           provider=export.execution_provider, threads=ws.threads or 1, latency=None,
                           score_labels=False, timeout_s=ws.measure_timeout_s)
        memory, _ = memory_of(export.execution_provider, measured.peak_rss_mb, measured.gpu_memory_mb)
        atomic_write_text(path, json.dumps({"memory_mb": memory}))
    return Footprint(size, json.loads(path.read_text())["memory_mb"])
