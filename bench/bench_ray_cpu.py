"""CPU taken by every process over a window, from /proc: run it beside a study to see what Ray's
own processes (driver, raylet, GCS, dashboard, log monitor) cost while trials train.

    python bench/bench_ray_cpu.py --seconds 300

Linux only (reads /proc/<pid>/stat); prints the busiest processes, their CPU seconds in the
window and their share of one core.
"""

from __future__ import annotations

import argparse
import os
import time


def snapshot() -> dict[str, tuple[str, float]]:
    """pid -> (command line, user + system CPU seconds so far)."""
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()   # after the command name
            out[pid] = (cmd, (int(fields[11]) + int(fields[12])) / hz)   # utime, stime
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    before, t0 = snapshot(), time.time()
    time.sleep(args.seconds)
    after, window = snapshot(), time.time() - t0
    rows = sorted(((after[k][1] - before[k][1], after[k][0]) for k in after if k in before), reverse=True)
    print(f"window {window:.0f} s, {os.cpu_count()} CPUs")
    print("| CPU seconds | share of one core | process |\n|---|---|---|")
    for cpu, cmd in rows[:args.top]:
        print(f"| {cpu:.1f} | {100 * cpu / window:.1f} % | `{cmd[:90]}` |")


if __name__ == "__main__":
    main()
