"""Validation of a 50-megapixel result: libvips streaming decode vs a full Pillow decode.

    .venv/bin/python bench/validate_50mp.py

Each contender runs in a fresh subprocess so its peak RSS is its own; both decode the same
PNG whole. Prints time, peak RSS and the ratios (the target: a quarter of Pillow's memory
or less).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIDTH, HEIGHT = 8660, 5773  # 49,994,180 pixels, just under Upsampler's limit

CONTENDERS = {  # name: (imports, the measured code)
    "smi.imaging.validate (libvips, streaming)": (
        "from smi import imaging",
        "imaging.validate(PATH, %d, %d)" % (WIDTH, HEIGHT),
    ),
    "Pillow Image.open().load() (baseline)": (
        "from PIL import Image; Image.MAX_IMAGE_PIXELS = None",
        "Image.open(PATH).load()",
    ),
}

# VmHWM (the process's own high-water mark; ru_maxrss can carry the parent's across exec).
# The contender's imports happen before `base`, so the growth is the decode alone.
RUNNER = """
import json, sys, time
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
PATH = sys.argv[1]
{imports}
base = hwm()
start = time.perf_counter()
{code}
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "peak_kib": hwm(), "base_kib": base}}))
"""


def make_image(path: Path) -> None:
    import pyvips

    # A textured RGB image (noise over a gradient), so the PNG is realistically large.
    noise = pyvips.Image.gaussnoise(WIDTH, HEIGHT, sigma=40, mean=128)
    gradient = pyvips.Image.xyz(WIDTH, HEIGHT)[0] * (255 / WIDTH)
    rgb = noise.bandjoin([gradient, (noise + gradient) / 2]).cast("uchar")
    rgb.pngsave(str(path), compression=1)


def run(imports: str, code: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", RUNNER.format(imports=imports, code=code), str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "result.png"
        started = time.perf_counter()
        make_image(path)
        print(
            f"test image: {WIDTH}x{HEIGHT} PNG, {path.stat().st_size / 1e6:.0f} MB "
            f"(made in {time.perf_counter() - started:.1f} s)"
        )
        results = {name: run(imports, code, path) for name, (imports, code) in CONTENDERS.items()}
    ours, baseline = results.values()
    for name, r in results.items():
        growth = (r["peak_kib"] - r["base_kib"]) / 1024
        print(
            f"{name:45s} {r['seconds']:6.2f} s   peak RSS {r['peak_kib'] / 1024:7.1f} MiB "
            f"(+{growth:6.1f} MiB while decoding)"
        )
    grow_ours, grow_base = ours["peak_kib"] - ours["base_kib"], baseline["peak_kib"] - baseline["base_kib"]
    print(f"memory ratio (ours / Pillow, growth while decoding): {grow_ours / grow_base:.3f}  (target <= 0.25)")
    print(f"memory ratio (ours / Pillow, whole-process peak): {ours['peak_kib'] / baseline['peak_kib']:.3f}")
    print(f"time ratio (ours / Pillow): {ours['seconds'] / baseline['seconds']:.2f}")


if __name__ == "__main__":
    main()
