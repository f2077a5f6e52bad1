"""Export throughput: freezeframe's ``export_snapshot_images`` against a bare ``qemu-img
convert`` of the same image, alternating, in the same run.

The source is a two-layer qcow2 chain made here (``--size`` virtual, ``--data`` written to the
base with qemu-io, a quarter of that overwritten in the top layer), or ``--image PATH
[--image-format FMT]``. Each run exports the top image (read through its chain) to a fresh
directory: freezeframe (convert with progress parsing, fsync, ``qemu-img info``/``check`` of
the result, link into place, metadata file) vs ``qemu-img convert -f F -O qcow2 SRC DST``
alone (qemu-img's default ``cache=unsafe``, no flush: the cheapest possible copy), and that
convert followed by an ``fsync`` of the result (the durability freezeframe pays for). Throughput
is the data written by the guest (allocated bytes of the chain's view) per second, and the
virtual size per second; the page cache is warm for both (the first, discarded run warms it).

    .venv/bin/python bench/export_bench.py [--runs 5] [--size 2G] [--data 1G] [--compress]
        [--format qcow2|raw] [--image PATH --image-format qcow2] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from freezeframe.storage.export import ExportDisk, export_snapshot_images

MIB = 1 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper()
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def make_source(directory: Path, size: int, data: int) -> str:
    base = directory / "base.qcow2"
    top = directory / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size)], check=True)
    # distinct 64 MiB chunks so nothing is all-zero (qemu-img convert skips zeroes)
    chunk = 64 * MIB
    cmds: list[str] = []
    for i, off in enumerate(range(0, data, chunk)):
        cmds += ["-c", f"write -P {(i % 250) + 1} {off} {min(chunk, data - off)}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(base)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)  # fmt: skip
    quarter = data // 4
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0xee 0 {quarter}", str(top)],
                   check=True, capture_output=True)  # fmt: skip
    return str(top)


def allocated_bytes(image: str, fmt: str) -> int:
    """Bytes of the image's view that hold data (``qemu-img map`` of the whole chain)."""
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", fmt, image],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return sum(int(e["length"]) for e in json.loads(out) if e.get("data"))


async def run_freezeframe(src: str, fmt: str, out_fmt: str, compress: bool, dest: Path) -> float:
    t0 = time.monotonic()
    await export_snapshot_images(
        [ExportDisk("vda", src, fmt)], dest, fmt=out_fmt, compress=compress, metadata={"b": 1}
    )
    return time.monotonic() - t0


def run_convert(
    src: str, fmt: str, out_fmt: str, compress: bool, dest: Path, sync: bool = False
) -> float:
    dest.mkdir()
    argv = ["qemu-img", "convert", "-f", fmt, "-O", out_fmt, *(["-c"] if compress else []),
            src, str(dest / f"vda.{out_fmt}")]  # fmt: skip
    t0 = time.monotonic()
    subprocess.run(argv, check=True)
    if sync:  # what freezeframe pays for a durable file before it is linked into place
        fd = os.open(dest / f"vda.{out_fmt}", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", default="2G")
    ap.add_argument("--data", default="1G")
    ap.add_argument("--format", default="qcow2", choices=("qcow2", "raw"))
    ap.add_argument("--compress", action="store_true")
    ap.add_argument("--image")
    ap.add_argument("--image-format", default="qcow2")
    ap.add_argument("--dir", default="/var/tmp", help="where the scratch directory is made")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ff-export-bench-", dir=args.dir))
    try:
        if args.image:
            src, fmt = args.image, args.image_format
        else:
            (work / "src").mkdir()
            src, fmt = (
                make_source(work / "src", parse_size(args.size), parse_size(args.data)),
                "qcow2",
            )
        argv = ["qemu-img", "info", "-U", "--output=json", "-f", fmt, src]
        info = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
        vsize = int(info["virtual-size"])
        data = allocated_bytes(src, fmt)
        times: dict[str, list[float]] = {
            "freezeframe": [],
            "qemu-img convert": [],
            "convert + fsync": [],
        }
        for i in range(args.runs + 1):  # run 0 warms the page cache, discarded
            order = list(times)
            if i % 2:
                order.reverse()
            for what in order:
                dest = work / f"out-{i}-{what.replace(' ', '_').replace('+', '')}"
                if what == "freezeframe":
                    t = asyncio.run(run_freezeframe(src, fmt, args.format, args.compress, dest))
                else:
                    sync = what == "convert + fsync"
                    t = run_convert(src, fmt, args.format, args.compress, dest, sync)
                shutil.rmtree(dest)
                if i:
                    times[what].append(t)
        rows = {}
        for what, ts in times.items():
            med = statistics.median(ts)
            rows[what] = {
                "median_s": round(med, 3),
                "min_s": round(min(ts), 3),
                "max_s": round(max(ts), 3),
                "data_MBps": round(data / MIB / med, 1),
                "virtual_MBps": round(vsize / MIB / med, 1),
            }
        ratio = rows["freezeframe"]["median_s"] / rows["qemu-img convert"]["median_s"]
        ratio_sync = rows["freezeframe"]["median_s"] / rows["convert + fsync"]["median_s"]
        result = {
            "source": src if args.image else "2-layer qcow2 chain (made here)",
            "virtual_size": vsize,
            "data_bytes": data,
            "format": args.format,
            "compress": args.compress,
            "runs": args.runs,
            "results": rows,
            "freezeframe_over_convert": round(ratio, 3),
            "freezeframe_over_convert_fsync": round(ratio_sync, 3),
        }
        print(f"source: {result['source']}: {vsize / MIB:.0f} MiB virtual, "
              f"{data / MIB:.0f} MiB data; -> {args.format}{' -c' if args.compress else ''}, "
              f"{args.runs} runs each (alternating)")  # fmt: skip
        print(f"{'':18} {'median s':>9} {'min':>7} {'max':>7} {'data MB/s':>10} {'virt MB/s':>10}")
        for what, r in rows.items():
            print(f"{what:18} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['max_s']:7.3f} "
                  f"{r['data_MBps']:10.1f} {r['virtual_MBps']:10.1f}")  # fmt: skip
        print(f"freezeframe / qemu-img convert (median time): {ratio:.3f}; "
              f"/ convert + fsync: {ratio_sync:.3f}")  # fmt: skip
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
