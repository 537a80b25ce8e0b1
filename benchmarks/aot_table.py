"""The pod-scale table of BENCHMARKS.md: ``python -m dar_jax.aot`` over the configs and slices.

    python benchmarks/aot_table.py --out runs/aot              # compile every row (slow: minutes each)
    python benchmarks/aot_table.py --out runs/aot --only xl_v5p32 sample_v5e8
    python benchmarks/aot_table.py --out runs/aot --table      # the markdown table from the JSONs

Each row is one ``dar_jax.aot`` command (a fresh process, ``--parallel`` at a time); its JSON
report and optimized HLO are kept in ``--out`` so the table can be rebuilt without compiling.
The figures are the TPU compiler's analyses plus a roofline, not measurements on a TPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROWS = {
    "xl_v5p32": ["--config", "configs/ar_gpt_xl.py", "--topology", "v5p-32"],
    "xxl_v5p32": ["--config", "configs/ar_gpt_xxl.py", "--topology", "v5p-32"],
    "xl_v5e256": ["--config", "configs/ar_gpt_xl.py", "--topology", "v5e-256"],
    "xxl_v5e256": ["--config", "configs/ar_gpt_xxl.py", "--topology", "v5e-256"],
    "tok_v5p32": ["--config", "configs/tokenizer_v1.py", "--topology", "v5p-32"],
    "sample_v5e8": ["--program", "sample", "--gpt-config", "GPT-XL", "--tokenizer-config",
                    "configs/tokenizer_v1.py", "--batch", "256", "--topology", "v5e-8"],
    # the remat policy against its alternatives (GPT-XL, v5p-32)
    "xl_v5p32_full": ["--config", "configs/ar_gpt_xl.py", "--topology", "v5p-32",
                      "--config.model.remat=full"],
    "xl_v5p32_none": ["--config", "configs/ar_gpt_xl.py", "--topology", "v5p-32",
                      "--config.model.remat=none"],
    "l_v5p32": ["--config", "configs/ar_gpt_l.py", "--topology", "v5p-32"],
    # pre-extracted codes (data.kind=codes): the step without the frozen tokenizer's encode
    "xl_v5p32_codes": ["--config", "configs/ar_gpt_xl.py", "--topology", "v5p-32",
                       "--config.data.kind=codes"],
}


def run_rows(names, out: str, parallel: int) -> None:
    os.makedirs(out, exist_ok=True)
    pending = list(names)
    running = []
    while pending or running:
        while pending and len(running) < parallel:
            name = pending.pop(0)
            cmd = [sys.executable, "-m", "dar_jax.aot", *ROWS[name], "--json",
                   os.path.join(out, f"{name}.json"), "--hlo", os.path.join(out, f"{name}.hlo")]
            log = open(os.path.join(out, f"{name}.log"), "w")
            print(f"start {name}: {' '.join(cmd[1:])}", flush=True)
            running.append((name, subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT),
                            time.perf_counter()))
        time.sleep(5)
        for item in list(running):
            name, proc, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                print(f"done {name}: exit {proc.returncode} after {time.perf_counter() - t0:.0f} s",
                      flush=True)


def _gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.1f}"


def table(out: str, names) -> str:
    head = ("| program | slice (chips) | batch / chip | HBM GiB / capacity | fits | remat | "
            "remat overhead | attention kernels (sites on XLA) | collectives GB / chip (ratio to "
            "FSDP minimum) | est. step s (bound) | est. MFU | est. images/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in names:
        path = os.path.join(out, f"{name}.json")
        if not os.path.exists(path):
            continue
        r = json.load(open(path))
        prog = " ".join(ROWS[name][1:2] if r["program"] == "train" else ["sample", "GPT-XL + v1"])
        prog += "".join(f" {a[len('--config.'):]}" for a in ROWS[name] if a.startswith("--config."))
        remat = r.get("remat", "-")
        kernels = r.get("attention_kernels") or {}
        kern = ", ".join(f"{s}: {k.split('_')[0] if k.startswith('splash') else k}"
                         for s, k in kernels.items())
        coll = r.get("collectives")
        coll_s = "-" if coll is None else _gb(sum(coll.values()))
        if r.get("collective_ratio") is not None:
            coll_s += f" ({r['collective_ratio']:.2f})"
        hbm = r.get("hbm_per_chip_gib")
        hbm_s = "-" if hbm is None else f"{hbm:.1f}"
        est = r.get("est_step_s")
        est_s = "-" if est is None else f"{est:.3f} ({r['est_bound']})"
        mfu = r.get("est_mfu")
        mfu_s = "-" if mfu is None else f"{100 * mfu:.0f}%"
        ips = r.get("est_images_per_s")
        ips_s = "-" if ips is None else f"{ips:.0f}"
        over = r.get("remat_overhead")
        lines.append(
            f"| {prog} | {r['topology']} ({r['num_chips']}) | {r['per_chip_batch']:g} | "
            f"{hbm_s} / {r['hbm_capacity_gib']:.1f} | {'yes' if r.get('fits') else 'no'} | "
            f"{remat} | {'-' if over is None else over} | {kern or '-'} "
            f"({r.get('attention_sites_on_xla', '-')}) | {coll_s} | {est_s} | {mfu_s} | {ips_s} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "aot"))
    ap.add_argument("--only", nargs="+", choices=sorted(ROWS), default=None)
    ap.add_argument("--parallel", type=int, default=2, help="compiles at a time (memory: ~8 GB each)")
    ap.add_argument("--table", action="store_true", help="only print the table of existing JSONs")
    args = ap.parse_args()
    names = args.only or list(ROWS)
    if not args.table:
        run_rows(names, args.out, args.parallel)
    print(table(args.out, names))


if __name__ == "__main__":
    main()
