"""Benchmark: the main job (`retro-ray pipeline`, configs/quickstart.yaml) end to end, as a user
runs it: each stage's wall time and peak memory (the resident memory of the job's whole process
tree, Ray's workers included, sampled every half second), the total against the 20-minute goal,
and what the terminal showed: its lines, and how many of them Ray printed (the goal is none);
how many of the demo questions' printed answers hold a gold answer.

    python bench/pipeline.py [--workdir bench/out/pipeline] [--keep] [--config configs/quickstart.yaml]

A fresh run directory each time unless --keep (then finished stages are skipped). Last line:
``{"stages": {NAME: {"s", "peak_rss_mb"}}, "total_s", "terminal_lines", "ray_internal_lines", "demo", ...}``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, tree_rss_mb  # noqa: E402

GOAL_S = 1200
STAGE = re.compile(r"pipeline: stage \d+/\d+ (\w+)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "pipeline"))
    parser.add_argument("--keep", action="store_true", help="keep the run directory (finished stages are skipped)")
    parser.add_argument("--config", help="the run's config (default: the quickstart's)")
    args = parser.parse_args()
    from retro_ray.core.runtime import RAY_LINE

    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "retro-ray"), "pipeline", "--set", f"workdir={args.workdir}",
           *(["--config", args.config] if args.config else [])]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    current, marks, peaks = ["start"], [("start", start)], {}

    def sample() -> None:
        while proc.poll() is None:
            peaks[current[0]] = max(peaks.get(current[0], 0.0), tree_rss_mb(proc.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line.rstrip("\n"))
        found = STAGE.search(line)
        if found:
            current[0] = found.group(1)
            marks.append((found.group(1), time.time()))
        elif "pipeline: serving" in line:  # the app, the question, the app taken down
            current[0] = "serve"
            marks.append(("serve", time.time()))
    proc.wait()
    sampler.join()
    end = time.time()
    marks.append(("end", end))
    stages = {name: {"s": round(t1 - t0, 1), "peak_rss_mb": round(peaks.get(name, 0.0))}
              for (name, t0), (_, t1) in zip(marks, marks[1:])}
    total = end - start
    ray_lines = [line for line in lines if RAY_LINE.search(line)]
    for line in ray_lines[:20]:
        print(f"Ray's line on the terminal: {line[:200]}")
    answer = next((lines[i + 2] for i, line in enumerate(lines) if "retro-ray: asked" in line and i + 2 < len(lines)), None)
    print(f"\nexit code {proc.returncode}; total {total:.0f} s = {total / GOAL_S:.2f} of the {GOAL_S} s goal; "
          f"{len(lines)} terminal lines, {len(ray_lines)} printed by Ray")
    demo_file = Path(args.workdir) / "eval" / "demo.json"
    demo = json.loads(demo_file.read_text()) if demo_file.exists() else {}
    print(json.dumps({"stages": stages, "total_s": round(total, 1), "goal_ratio": round(total / GOAL_S, 3),
                      "terminal_lines": len(lines), "ray_internal_lines": len(ray_lines),
                      "exit_code": proc.returncode, "answer": answer,
                      "demo": {"asked": demo.get("asked"), "correct": demo.get("correct")}}))


if __name__ == "__main__":
    main()
