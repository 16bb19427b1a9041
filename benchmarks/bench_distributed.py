"""Multi-process throughput: images/s of Flow-GRPO training (sampling + update) with 1 and with N
processes (default 2) on this machine's CPU cores, the same global batch, and the ratio.

Both arms are real `diffalign train` runs of the shipped `shapes-flow` model (the N-process arm
through `--num-processes N`, DDP over gloo), one thread per process (OMP_NUM_THREADS=1).

- images/s: from each run's metrics.jsonl (`sample_s` + `train_s` per epoch, median over the epochs
  after the first), so process start-up is excluded. On N idle cores the ideal ratio is N.
- CPU seconds per image: the CPU time of all processes of a run of E epochs minus that of a 1-epoch
  run, over the (E - 1) epochs' images. It does not depend on how busy the machine is, so it
  measures what N processes cost over one (replayed rollout noise, communication); ideal ratio 1.

On a shared machine the wall-clock figures depend on the load (a 2-process arm gets two shares
of a busy CPU), so the arms alternate and the load average is printed: state it with the numbers.

Run: `python benchmarks/bench_distributed.py [--processes 2] [--epochs 4] [--repeats 1]`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = """model: shapes-flow
method: flow_grpo
checkpoint_every: 1000
device: cpu
algorithm: {{group_size: 8, batch_size: {batch}, num_steps: 10, micro_batch_size: {micro}, timestep_fraction: 0.5}}
"""


def run(config: Path, run_dir: Path, processes: int, epochs: int) -> tuple[list[dict], float]:
    """``(metrics rows, CPU seconds of every process of the run)``."""
    cmd = [sys.executable, "-m", "diffalign", "train", str(config), f"epochs={epochs}", "--run-dir", str(run_dir)]
    if processes > 1:
        cmd += ["--num-processes", str(processes)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="global images per epoch (a multiple of 8 * processes)")
    p.add_argument("--micro", type=int, default=16, help="micro-batch size of the one-process update plan")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    print(f"cpu cores: {os.cpu_count()}, load average before: {os.getloadavg()}", flush=True)
    arms = (1, args.processes)
    wall: dict[int, list[float]] = {n: [] for n in arms}
    sample: dict[int, list[float]] = {n: [] for n in arms}
    cpu: dict[int, list[float]] = {n: [] for n in arms}
    with tempfile.TemporaryDirectory() as d:
        config = Path(d) / "bench.yaml"
        config.write_text(CONFIG.format(batch=args.batch, micro=args.micro))
        for i in range(args.repeats):
            for n in arms:
                _, cpu_short = run(config, Path(d) / f"short-{n}-{i}", n, 1)
                rows, cpu_long = run(config, Path(d) / f"long-{n}-{i}", n, args.epochs)
                steady = rows[1:]
                wall[n].append(statistics.median(args.batch / (r["sample_s"] + r["train_s"]) for r in steady))
                sample[n].append(statistics.median(args.batch / r["sample_s"] for r in steady))
                cpu[n].append((cpu_long - cpu_short) / ((args.epochs - 1) * args.batch))
                print(f"  repeat {i}, {n} process(es): {wall[n][-1]:.2f} images/s "
                      f"(sampling alone {sample[n][-1]:.2f}), "
                      f"{cpu[n][-1]:.3f} CPU s/image", flush=True)
    one, many = arms
    w1, wn = statistics.median(wall[one]), statistics.median(wall[many])
    s1, sn = statistics.median(sample[one]), statistics.median(sample[many])
    c1, cn = statistics.median(cpu[one]), statistics.median(cpu[many])
    print(f"load average after: {os.getloadavg()}")
    print(f"images/s, sampling + update: 1 process {w1:.2f}, {many} processes {wn:.2f}, ratio {wn / w1:.2f} "
          f"(ideal {many})")
    print(f"images/s, sampling alone:    1 process {s1:.2f}, {many} processes {sn:.2f}, ratio {sn / s1:.2f}")
    print(f"CPU s/image (all processes): 1 process {c1:.3f}, {many} processes {cn:.3f}, ratio {cn / c1:.2f} (ideal 1)")


if __name__ == "__main__":
    main()
