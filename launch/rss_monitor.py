#!/usr/bin/env python
"""Run a command and sample the resident memory of every process it starts (Linux /proc), e.g. the ranks
of a torchrun job:

    python launch/rss_monitor.py --out runs/big_mem -- torchrun --nproc_per_node 2 -m nexus_megatron.cli ...

Every ``--interval`` seconds it reads VmRSS, RssAnon, RssFile and VmHWM of each descendant process;
the command's output lines are echoed and stored with the seconds since the start. Writes
``OUT.csv`` (t, pid, name, rss/anon/file/hwm in MiB), ``OUT.log`` (the output, time-stamped) and
``OUT.json`` (per process: peak VmRSS seen, last VmHWM read, peak RssAnon; and the sum over the
processes of their RSS at each sample, the job's peak). Exits with the command's status.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def _status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("Name", "VmRSS", "RssAnon", "RssFile", "VmHWM", "PPid"):
                    out[k] = v.strip()
    except OSError:
        return {}
    return out


def _children() -> dict:
    """{pid: ppid} of every process."""
    res = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    s = f.read()
                res[int(d)] = int(s[s.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return res


def _descendants(root: int) -> list:
    parent = _children()
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(c for c, pp in parent.items() if pp == p)
    return out


def _mib(v: str) -> float:
    return int(v.split()[0]) / 1024.0 if v else 0.0   # /proc reports kB


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="prefix of OUT.csv / OUT.log / OUT.json")
    p.add_argument("--interval", type=float, default=0.25)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        p.error("give the command after --")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    log = open(a.out + ".log", "w")

    def pump():
        for line in proc.stdout:
            s = f"[{time.time() - t0:8.1f}s] {line}"
            log.write(s)
            log.flush()
            sys.stdout.write(s)
            sys.stdout.flush()
    th = threading.Thread(target=pump, daemon=True)
    th.start()
    csv = open(a.out + ".csv", "w")
    csv.write("t,pid,name,rss_mib,anon_mib,file_mib,hwm_mib\n")
    peak = {}
    total_peak = (0.0, 0.0)
    while proc.poll() is None:
        t = time.time() - t0
        total = 0.0
        for pid in _descendants(proc.pid):
            st = _status(pid)
            if not st:
                continue
            rss, anon, fil, hwm = (_mib(st.get(k, "")) for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"))
            total += rss
            try:
                with open(f"/proc/{pid}/cmdline") as f:
                    name = f.read().replace("\0", " ").strip()[:120]
            except OSError:
                name = st.get("Name", "?")
            csv.write(f"{t:.2f},{pid},{st.get('Name', '?')},{rss:.1f},{anon:.1f},{fil:.1f},{hwm:.1f}\n")
            r = peak.setdefault(pid, {"cmd": name, "peak_rss_mib": 0.0, "peak_anon_mib": 0.0, "vm_hwm_mib": 0.0,
                                      "peak_rss_t": 0.0})
            if rss > r["peak_rss_mib"]:
                r["peak_rss_mib"], r["peak_rss_t"] = rss, t
            r["peak_anon_mib"] = max(r["peak_anon_mib"], anon)
            r["vm_hwm_mib"] = max(r["vm_hwm_mib"], hwm)
        if total > total_peak[0]:
            total_peak = (total, t)
        time.sleep(a.interval)
    th.join(timeout=5)
    rc = proc.wait()
    summary = {"cmd": cmd, "rc": rc, "wall_s": time.time() - t0, "sum_rss_peak_mib": total_peak[0],
               "sum_rss_peak_t": total_peak[1],
               "processes": {str(k): v for k, v in peak.items() if v["peak_rss_mib"] > 50}}
    json.dump(summary, open(a.out + ".json", "w"), indent=1)
    print(json.dumps(summary, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
