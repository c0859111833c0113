"""The spatial index of a worker's geofences: a uniform grid over longitude/latitude.

Pure code: rebuilt from the ``geofences`` rows whenever they change
(:mod:`fleet_telemetry.consumers.rules.timers` polls for that).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from fleet_telemetry.consumers.rules.geometry import M_PER_DEGREE, Geofence, polygons_cover

# A fence whose bounding box spans more grid cells than this is tested by bounding box.
_MAX_CELLS_PER_FENCE = 4096

# Cells on a side of a block (a power of two): segments away from every fence boundary
# are ruled out a block at a time.
_BLOCK_SHIFT = 3

NOWHERE: frozenset[int] = frozenset()
"""No fence at all."""


_Boxed = tuple[float, float, float, float, int]
"""A fence's id after its bounding box (west, south, east, north)."""


class GeofenceIndex:
    """A uniform grid over longitude/latitude, built once per set of fences.

    Each cell lists the fences that surely cover the whole cell and the fences whose
    boundary may pass through it. A point in a cell without boundary fences is decided
    by one dictionary look-up; only points in boundary cells get the exact test. Fences
    too large for the grid are tested by bounding box, then exactly.

    A segment between two readings finds the fences it may cross in the cells around it
    (one look-up for a short one, blocks of 8 x 8 cells for a long one); a reading with
    nothing of the grid in the blocks around it and the previous reading is
    :meth:`apart` from every fence. The grid holds fence ids and numbers only: nothing
    for the garbage collector to walk through on each full collection.
    """

    def __init__(self, fences: Iterable[Geofence]) -> None:
        self.fences: dict[int, Geofence] = {f.id: f for f in fences}
        spans = sorted(max(f.bbox[2] - f.bbox[0], f.bbox[3] - f.bbox[1]) for f in self.fences.values())
        median = spans[len(spans) // 2] if spans else 0.01
        # About six cells across a typical fence, so most cells are wholly in or out.
        self.cell = min(1.0, max(0.0005, median / 6))
        inside: dict[int, set[int]] = {}
        boundary: dict[int, list[int]] = {}
        large: list[Geofence] = []
        for fence in self.fences.values():
            x0, y0, x1, y1 = (int(v // self.cell) for v in fence.bbox)
            if (x1 - x0 + 1) * (y1 - y0 + 1) > _MAX_CELLS_PER_FENCE:
                large.append(fence)
                continue
            for key, full in _classify(fence, self.cell, x0, y0, x1, y1):
                if full:
                    inside.setdefault(key, set()).add(fence.id)
                else:
                    boundary.setdefault(key, []).append(fence.id)
        self.large: tuple[Geofence, ...] = tuple(large)
        self._limits = {f.id: f.speed_limit_kmh for f in self.fences.values() if f.speed_limit_kmh is not None}
        self._lowest: dict[frozenset[int], float] = {NOWHERE: math.inf}
        dwells = [f.dwell_seconds for f in self.fences.values() if f.dwell_seconds is not None]
        self.shortest_dwell = min(dwells, default=math.inf)
        shared: dict[frozenset[int], frozenset[int]] = {}
        self._inside = {key: shared.setdefault(frozenset(ids), frozenset(ids)) for key, ids in inside.items()}
        """Per cell: the fences that cover all of it."""
        self._edges = {key: tuple(ids) for key, ids in boundary.items()}
        """Per cell: the fences whose boundary may pass through it."""
        # For the segments: the fences whose boundary passes the 3 x 3 cells around each
        # cell, and each block of cells, with their bounding boxes; and the blocks with a
        # cell of any fence in or next to them (around the others there is no fence).
        around: dict[int, list[int]] = {}
        blocks: dict[int, list[int]] = {}
        for key, ids in boundary.items():
            ix, iy = _cell_of(key)
            for column in ((ix - 1) << 20, ix << 20, (ix + 1) << 20):
                for row in (iy - 1, iy, iy + 1):
                    around.setdefault(column + row, []).extend(ids)
            blocks.setdefault(((ix >> _BLOCK_SHIFT) << 20) + (iy >> _BLOCK_SHIFT), []).extend(ids)
        self._around = self._with_boxes(around)
        self._blocks = self._with_boxes(blocks)
        occupied = {(ix >> _BLOCK_SHIFT, iy >> _BLOCK_SHIFT)
                    for ix, iy in map(_cell_of, inside.keys() | boundary.keys())}
        self._near = frozenset(((bx + dx) << 20) + by + dy for bx, by in occupied for dx in (-1, 0, 1)
                               for dy in (-1, 0, 1))

    def _with_boxes(self, groups: dict[int, list[int]]) -> dict[int, tuple[_Boxed, ...]]:
        """Each group's fences once, after their bounding boxes."""
        boxed = {fid: (*f.bbox, fid) for fid, f in self.fences.items()}
        return {key: tuple(boxed[fid] for fid in dict.fromkeys(ids)) for key, ids in groups.items()}

    def __len__(self) -> int:
        return len(self.fences)

    def key(self, lon: float, lat: float) -> int:
        cell = self.cell
        return (int(lon // cell) << 20) + int(lat // cell)

    def apart(self, ix: int, iy: int, lon: float, lat: float) -> bool:
        """Whether cell (``ix``, ``iy``) is in no fence, and no fence's boundary can meet a
        segment from it to (``lon``, ``lat``): nothing around them is in the index."""
        if self.large or ((ix >> _BLOCK_SHIFT) << 20) + (iy >> _BLOCK_SHIFT) in self._near:
            return False
        cell = self.cell
        dx = (int(lon // cell) >> _BLOCK_SHIFT) - (ix >> _BLOCK_SHIFT)
        dy = (int(lat // cell) >> _BLOCK_SHIFT) - (iy >> _BLOCK_SHIFT)
        return -1 <= dx <= 1 and -1 <= dy <= 1

    def lowest_limit(self, ids: frozenset[int]) -> float:
        """The lowest speed limit of the fences ``ids`` (infinite when none has one)."""
        low = self._lowest.get(ids)
        if low is None:
            limits = self._limits
            low = min((limits[i] for i in ids if i in limits), default=math.inf)
            if len(self._lowest) < _MAX_CELLS_PER_FENCE:
                self._lowest[ids] = low
        return low

    def containing(self, lon: float, lat: float) -> frozenset[int]:
        """Ids of the fences that cover the point."""
        return self.locate(self.key(lon, lat), lon, lat)[0]

    def locate(self, key: int, lon: float, lat: float) -> tuple[frozenset[int], bool]:
        """(fences covering the point, whether its cell is free of fence boundaries)."""
        found = self._inside.get(key, NOWHERE)
        edges = self._edges.get(key)
        if edges is None and not self.large:
            return found, True
        fences = self.fences
        hits = [fid for fid in edges if fences[fid].covers(lon, lat)] if edges is not None else []
        hits += [f.id for f in self.large if f.covers(lon, lat)]
        return (found.union(hits) if hits else found), False

    def near_segment(self, lon1: float, lat1: float, lon2: float, lat2: float) -> Sequence[Geofence]:
        """Fences whose bounding box meets the segment's and whose boundary may pass through
        a cell near the segment's box (each fence once).

        Every fence whose boundary the segment meets is among them.
        """
        w, e = (lon1, lon2) if lon1 <= lon2 else (lon2, lon1)
        s, n = (lat1, lat2) if lat1 <= lat2 else (lat2, lat1)
        cell = self.cell
        x0, x1, y0, y1 = int(w // cell), int(e // cell), int(s // cell), int(n // cell)
        if (x1 - x0 + 1) * (y1 - y0 + 1) > 4 * _MAX_CELLS_PER_FENCE:
            return [f for f in self.fences.values()
                    if f.bbox[0] <= e and f.bbox[2] >= w and f.bbox[1] <= n and f.bbox[3] >= s]
        fences = self.fences
        if x1 - x0 < 3 and y1 - y0 < 3 and not self.large:  # the common case: one look-up
            around = self._around.get(((x0 + 1) << 20) + y0 + 1)
            if around is None:
                return ()
            return [fences[fid] for fw, fs, fe, fn, fid in around if fw <= e and fe >= w and fs <= n and fn >= s]
        if x1 - x0 < 6 and y1 - y0 < 6:  # the 3 x 3 cells around every third cell
            get, step = self._around.get, 3
            x0, x1, y0, y1 = x0 + 1, x1 + 1, y0 + 1, y1 + 1
        else:  # a long segment: fewer look-ups by block
            get, step = self._blocks.get, 1
            x0, x1, y0, y1 = x0 >> _BLOCK_SHIFT, x1 >> _BLOCK_SHIFT, y0 >> _BLOCK_SHIFT, y1 >> _BLOCK_SHIFT
        found: dict[int, Geofence] = {}
        for gx in range(x0, x1 + 1, step):
            for gy in range(y0, y1 + 1, step):
                for fw, fs, fe, fn, fid in get((gx << 20) + gy, ()):
                    if fw <= e and fe >= w and fs <= n and fn >= s:
                        found[fid] = fences[fid]
        for f in self.large:
            if f.bbox[0] <= e and f.bbox[2] >= w and f.bbox[1] <= n and f.bbox[3] >= s:
                found[f.id] = f
        return list(found.values())


def _cell_of(key: int) -> tuple[int, int]:
    """The (column, row) of a cell key ``(column << 20) + row`` (rows of latitudes: below 2**19 in size)."""
    iy = ((key + (1 << 19)) & ((1 << 20) - 1)) - (1 << 19)
    return (key - iy) >> 20, iy


def _classify(fence: Geofence, cell: float, x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, bool]]:
    """The cells of a fence's bounding box that it touches: (key, covers the whole cell).

    Conservative: a cell is "whole" only when no boundary can pass through it; a cell the
    fence may touch but not surely cover is a boundary cell (exact test per point).
    """
    out: list[tuple[int, bool]] = []
    if fence.center is not None:
        assert fence.radius_m is not None
        lon0, lat0 = fence.center
        r = fence.radius_m
        if r > 50_000:  # far from flat: every cell is a boundary cell
            return [((ix << 20) + iy, False) for ix in range(x0, x1 + 1) for iy in range(y0, y1 + 1)]
        kx = M_PER_DEGREE * math.cos(math.radians(lat0))
        for ix in range(x0, x1 + 1):
            cx0, cx1 = (ix * cell - lon0) * kx, ((ix + 1) * cell - lon0) * kx
            for iy in range(y0, y1 + 1):
                cy0, cy1 = (iy * cell - lat0) * M_PER_DEGREE, ((iy + 1) * cell - lat0) * M_PER_DEGREE
                near_x = 0.0 if cx0 <= 0 <= cx1 else min(abs(cx0), abs(cx1))
                near_y = 0.0 if cy0 <= 0 <= cy1 else min(abs(cy0), abs(cy1))
                if math.hypot(near_x, near_y) > r * 1.02:
                    continue
                far = math.hypot(max(abs(cx0), abs(cx1)), max(abs(cy0), abs(cy1)))
                out.append(((ix << 20) + iy, far < r * 0.98))
        return out
    crossed: set[int] = set()
    for rings in fence.polygons:
        for xs, ys in rings:
            for i in range(1, len(xs)):
                ax, ay, bx, by = xs[i - 1], ys[i - 1], xs[i], ys[i]
                for ix in range(int(min(ax, bx) // cell), int(max(ax, bx) // cell) + 1):
                    for iy in range(int(min(ay, by) // cell), int(max(ay, by) // cell) + 1):
                        key = (ix << 20) + iy
                        if key not in crossed and _edge_meets_cell(ax, ay, bx, by, ix * cell, iy * cell, cell):
                            crossed.add(key)
    for ix in range(x0, x1 + 1):
        for iy in range(y0, y1 + 1):
            key = (ix << 20) + iy
            if key in crossed:
                out.append((key, False))
            elif polygons_cover(fence.polygons, (ix + 0.5) * cell, (iy + 0.5) * cell):
                out.append((key, True))
    return out


def _edge_meets_cell(ax: float, ay: float, bx: float, by: float, x0: float, y0: float, size: float) -> bool:
    """Whether a segment may touch a cell (conservative: true when in doubt)."""
    pad = size * 1e-6
    x0, y0, x1, y1 = x0 - pad, y0 - pad, x0 + size + pad, y0 + size + pad
    if max(ax, bx) < x0 or min(ax, bx) > x1 or max(ay, by) < y0 or min(ay, by) > y1:
        return False
    dx, dy = bx - ax, by - ay
    sides = [dx * (cy - ay) - dy * (cx - ax) for cx, cy in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))]
    return not (all(v > 0 for v in sides) or all(v < 0 for v in sides))
