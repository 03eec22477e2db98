"""Codec study for the targets store: compression and write throughput per Blosc setting.

For each array of a targets store (`codes`, `rgb_diff`) it takes `--clips` stored chunks as samples
and, per codec setting, times (one thread, the settings taken in turn) compressing them, writing
them into a Zarr array of the stage's layout (one chunk per clip) and decompressing them, checks the
round trip is bit-exact, and reports frames/s and the compression ratio. `codes_flipped` behaves like
`codes`. Figures print last and go to bench/results/targets_codecs-<device>.json.

    python bench/targets_codecs.py [--store data/targets.zarr] [--clips 24] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_file import save_results  # noqa: E402

# (cname, clevel, shuffle): today's setting first
SETTINGS = [("zstd", 3, "shuffle"), ("zstd", 1, "shuffle"), ("zstd", 1, "bitshuffle"),
            ("zstd", 3, "bitshuffle"), ("lz4", 5, "shuffle"), ("lz4", 5, "bitshuffle")]
SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


def label(cname: str, clevel: int, shuffle: str) -> str:
    return f"{cname}-{clevel}-{shuffle}"


class Trial:
    """One array under one codec setting: its compressed chunks and the best time of each step."""

    def __init__(self, chunks: np.ndarray, setting: tuple, work: Path) -> None:
        cname, clevel, shuffle = setting
        self.chunks, self.work = chunks, work
        self.codec = Blosc(cname=cname, clevel=clevel, shuffle=SHUFFLE[shuffle], blocksize=0)
        self.encoded = [self.codec.encode(chunk) for chunk in chunks]
        for chunk, blob in zip(chunks, self.encoded, strict=True):  # lossless, bit for bit
            decoded = np.frombuffer(self.codec.decode(blob), chunk.dtype).reshape(chunk.shape)
            assert np.array_equal(decoded, chunk)
        self.array = zarr.create_array(str(work), shape=chunks.shape, chunks=(1, *chunks.shape[1:]),
                                       dtype=chunks.dtype, fill_value=0,
                                       compressors=BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle))
        self.best = {"compress": np.inf, "write": np.inf, "decompress": np.inf}

    def time_once(self) -> None:
        """Compress, write through Zarr (one chunk per clip, as the stage does) and decompress once."""
        rows = list(enumerate(self.chunks))
        steps = {"compress": lambda: [self.codec.encode(chunk) for chunk in self.chunks],
                 "write": lambda: [self.array.__setitem__(row, chunk) for row, chunk in rows],
                 "decompress": lambda: [self.codec.decode(blob) for blob in self.encoded]}
        for step, work in steps.items():
            start = time.perf_counter()
            work()
            self.best[step] = min(self.best[step], time.perf_counter() - start)

    def figures(self) -> dict[str, float]:
        assert np.array_equal(zarr.open_array(str(self.work), mode="r")[:], self.chunks)
        frames = self.chunks.shape[0] * self.chunks.shape[1]
        return {"ratio": self.chunks.nbytes / sum(len(blob) for blob in self.encoded),
                **{f"{step}_fps": frames / seconds for step, seconds in self.best.items()},
                "compress_mb_per_s": self.chunks.nbytes / self.best["compress"] / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("data/targets.zarr"))
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    group = zarr.open_group(str(args.store), mode="r")
    samples = {name: group[name][: args.clips] for name in ("codes", "rgb_diff")}
    work = Path(tempfile.mkdtemp(prefix="bench-codecs-"))
    try:
        trials = {f"{name}/{label(*setting)}": Trial(chunks, setting, work / f"{name}-{label(*setting)}")
                  for name, chunks in samples.items() for setting in SETTINGS}
        # Round-robin over the settings, keeping each one's best time: load bursts on a shared
        # machine then cannot favour one setting.
        for _ in range(args.repeats):
            for trial in trials.values():
                trial.time_once()
        results = {key: trial.figures() for key, trial in trials.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shapes = {name: list(chunks.shape) for name, chunks in samples.items()}
    device = save_results("targets_codecs", {"store": str(args.store), "shapes": shapes, **results})
    print(f"targets codec study on {device}: {args.clips} chunks of {args.store} per array, one thread, "
          f"best of {args.repeats} round-robin; frames/s (rgb_diff counts T-1 frames per clip)")
    print(f"  {'array/setting':<30}{'ratio':>8}{'compress':>11}{'write':>10}{'decompress':>12}{'MB/s':>8}")
    for key, row in results.items():
        print(f"  {key:<30}{row['ratio']:8.2f}{row['compress_fps']:11.0f}{row['write_fps']:10.0f}"
              f"{row['decompress_fps']:12.0f}{row['compress_mb_per_s']:8.0f}")


if __name__ == "__main__":
    main()
