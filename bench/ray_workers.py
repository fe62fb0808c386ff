"""What one Ray worker process costs to start, with and without a job-level runtime_env, in one run.

    python bench/ray_workers.py [--actors 10] [--repeats 2]

Every stage run starts about ten worker processes (the TrainController, its training workers, the
placement-group cleaner, the data counter, one split coordinator per dataset, Ray Data's dataset manager and
task workers). Each test alternates, in fresh local Ray instances (num_cpus=8, no dashboard):
  plain        ray.init() with the settings in os.environ (what app.train.launcher.start_local_ray does)
  runtime_env  ray.init(runtime_env={"env_vars": {...}}) (what it did before)
and creates, uses and kills `--actors` actors one after another, after 12 that take the pre-started workers.
It reports the machine's CPU seconds (all processes, from /proc/stat) and wall seconds per actor, and the
runtime_env/plain ratio. Prints one JSON line; record it in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

CHILD = r'''
import os, sys, time
import ray

def cpu():
    v = list(map(int, open("/proc/stat").readline().split()[1:]))
    return (sum(v) - v[3] - v[4]) / 100

kwargs = dict(num_cpus=8, include_dashboard=False)
if sys.argv[1] == "runtime_env":
    kwargs["runtime_env"] = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
ray.init(**kwargs)

@ray.remote(num_cpus=0)
class Probe:
    def pid(self):
        return os.getpid()

def cycle(n):
    for _ in range(n):
        probe = Probe.remote()
        ray.get(probe.pid.remote())
        ray.kill(probe)

cycle(12)
time.sleep(3)
c0, t0 = cpu(), time.perf_counter()
cycle(int(sys.argv[2]))
print(cpu() - c0, time.perf_counter() - t0)
ray.shutdown()
'''


def one(mode: str, actors: int) -> tuple[float, float]:
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(actors)], capture_output=True, text=True,
                          check=True, env={**os.environ, "RAY_ADDRESS": ""})
    cpu, wall = map(float, done.stdout.split()[-2:])
    return cpu / actors, wall / actors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actors", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "runtime_env": []}
    for _ in range(args.repeats):
        for mode in runs:
            runs[mode].append(one(mode, args.actors))
            print(f"{mode}: {runs[mode][-1][0]:.2f} s CPU, {runs[mode][-1][1]:.2f} s wall per actor", file=sys.stderr)
    cpu = {mode: statistics.median(c for c, _ in values) for mode, values in runs.items()}
    wall = {mode: statistics.median(w for _, w in values) for mode, values in runs.items()}
    print(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "actors": args.actors,
                      "repeats": args.repeats, "cpu_s_per_actor": {k: round(v, 3) for k, v in cpu.items()},
                      "wall_s_per_actor": {k: round(v, 3) for k, v in wall.items()},
                      "runtime_env_over_plain_cpu": round(cpu["runtime_env"] / cpu["plain"], 2)}))


if __name__ == "__main__":
    main()
