"""Accelerator constants (per chip) and Cloud TPU topology names: the one place for them.

The figures are the vendors' published per-chip numbers: bf16 peak, HBM capacity, HBM
bandwidth and inter-chip (ICI) bandwidth. ``dar_jax.aot`` uses them for its roofline estimate
and where the compiler does not report a chip's HBM; ``logging.peak_tflops_per_device`` of a
run config takes ``peak_tflops``.
"""
from __future__ import annotations

import dataclasses
import re

from dar_jax.errors import DarError


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_tflops: float        # dense bf16 matmul peak
    hbm_gib: float
    hbm_tbps: float           # HBM bandwidth, TB/s
    ici_gbps: float           # inter-chip interconnect bandwidth, GB/s
    cores_per_chip: int       # Cloud TPU names count cores for these (v4-8 = 4 chips)
    dims: int                 # torus dimensions of the topology (2: v5e/v6e, 3: v4/v5p)


TPU_CHIPS = {
    "v4": Chip("v4", 275.0, 32.0, 1.2, 300.0, cores_per_chip=2, dims=3),
    "v5e": Chip("v5e", 197.0, 16.0, 0.82, 200.0, cores_per_chip=1, dims=2),
    "v5p": Chip("v5p", 459.0, 95.0, 2.77, 600.0, cores_per_chip=2, dims=3),
    "v6e": Chip("v6e", 918.0, 32.0, 1.64, 400.0, cores_per_chip=1, dims=2),
}
H100_SXM_BF16_TFLOPS = 989.0


class TopologyError(DarError, ValueError):
    """A topology name that is not a Cloud TPU slice."""


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: Chip
    shape: tuple[int, ...]    # chips per torus dimension

    @property
    def num_chips(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def name(self) -> str:
        """The Cloud TPU name: v5p-32 (cores) / v5e-8 (chips)."""
        return f"{self.chip.name}-{self.num_chips * self.chip.cores_per_chip}"

    @property
    def jax_name(self) -> str:
        """What ``jax.experimental.topologies.get_topology_desc`` takes: "v5p:2x2x4"."""
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"


def _shape(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape of ``chips`` (a power of two): double the smallest dimension, the last
    one on ties, after the host-sized 2x2x1 of 3-D slices (v5p: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4,
    ...; v5e: 2x2, 2x4, 4x4, 4x8, ..., 16x16)."""
    shape = [1] * dims
    n = 1
    if dims == 3:   # the host-sized slices first: 1x2x1, 2x2x1
        for i in (1, 0):
            if n < chips:
                shape[i], n = 2, n * 2
    while n < chips:
        i = max(range(dims), key=lambda d: (-shape[d], d))
        shape[i] *= 2
        n *= 2
    return tuple(shape)


def parse_topology(name: str) -> Topology:
    """``v5p-32`` / ``v5e-256`` (Cloud TPU names: v4 and v5p count cores, 2 per chip; v5e and
    v6e count chips) or an explicit ``v5p:2x2x4``. Raises :class:`TopologyError`."""
    text = name.strip().lower()
    known = ", ".join(sorted(TPU_CHIPS))
    m = re.fullmatch(r"(v\d+[a-z]?)[:](\d+(?:x\d+)*)", text)
    if m:
        gen, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
        if gen not in TPU_CHIPS:
            raise TopologyError(f"unknown TPU generation {gen!r} in {name!r}; known: {known}")
        chip = TPU_CHIPS[gen]
        if len(dims) != chip.dims or min(dims) < 1:
            raise TopologyError(f"{name!r}: a {gen} slice has {chip.dims} dimensions")
        return Topology(chip, dims)
    m = re.fullmatch(r"(v\d+[a-z]?)-(\d+)", text)
    if not m:
        raise TopologyError(f"unknown topology {name!r}: expected a Cloud TPU name such as v5p-32, "
                            f"v5e-256 or an explicit shape such as v5p:2x2x4 (generations: {known})")
    gen, count = m.group(1), int(m.group(2))
    if gen not in TPU_CHIPS:
        raise TopologyError(f"unknown TPU generation {gen!r} in {name!r}; known: {known}")
    chip = TPU_CHIPS[gen]
    if count % chip.cores_per_chip or count < chip.cores_per_chip:
        raise TopologyError(f"{name!r}: {gen} names count cores ({chip.cores_per_chip} per chip)")
    chips = count // chip.cores_per_chip
    if chips & (chips - 1):
        raise TopologyError(f"{name!r}: {chips} chips is not a power of two")
    return Topology(chip, _shape(chips, chip.dims))
