"""Benchmark CPU thread settings: time per training step of cl-runner's real loop for threads 1, 2 and auto.

For each model (the tiny default; a ~5M GPT-2, 6 x 256; a ~135M Llama shaped like SmolLM-135M: hidden 576,
30 layers, 9 heads, 3 kv heads, intermediate 1536, vocabulary 49152, tied embeddings) and each machine load
(quiet; one busy process, a Python busy loop this script starts; two cl-runs side by side), worker processes
build the run with the real ``build_parts`` (so ``device.threads=auto`` is applied as in a run) on the bundled
task sequence and time ``train_task`` for a few optimizer steps at each setting. Settings are interleaved within
each load (one unmeasured warm-up segment first, then 1, 2, auto in an order rotated every round) and loads are
interleaved across rounds; the median over rounds is reported. ``auto`` is whatever the policy chooses at that
moment (its choice is printed). With two cl-runs side by side both workers run the same setting at once and
their mean step time is reported. Workers wait passively (OMP_WAIT_POLICY=PASSIVE, as cl-run sets it); the
"2spin" column is torch's old default for comparison: 2 threads whose OpenMP waits spin.

    .venv/bin/python scripts/bench_threads.py   # all models (at load 6-12 on 2 cores: ~3 min a round for tiny + 5M,
                                                # ~13 min for one round of the 135M)
    .venv/bin/python scripts/bench_threads.py --models tiny --rounds 3 --out threads.json

Other processes on the machine change the figures: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

LLAMA_135M = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
              "num_key_value_heads": 3, "intermediate_size": 1536, "max_position_embeddings": 256,
              "tie_word_embeddings": True}
MODELS = {  # name -> (model.arch, or None for conf/model/tiny.yaml; overrides; seconds per segment; vocabulary)
    "tiny": (None, [], 1.0, None),
    "5m": (None, ["model.arch.n_layer=6", "model.arch.n_embd=256", "model.arch.n_head=4"], 1.5, None),
    "135m": (LLAMA_135M, ["train.batch_size=2"], 6.0, 49152),
}
SETTINGS = ("1", "2", "auto", "2spin")  # 2spin: 2 threads, OpenMP waiting actively (before)
LOADS = ("quiet", "busy", "pair")


# ----------------------------------------------------------------------------------------------- worker side
def worker(model: str) -> None:
    """Build the run's parts, then answer ``SETTING SECONDS`` lines on stdin with one JSON line each."""
    import dataclasses
    import tempfile

    from hydra import compose, initialize_config_dir

    from cl_runner.cli import CONF_DIR
    from cl_runner.config.validate import register_configs, validate
    from cl_runner.engine.assembly import build_parts
    from cl_runner.engine.loop import TaskRun, train_task
    from cl_runner.engine.threads import ThreadPolicy, count_this_run

    arch, overrides, _, vocab = MODELS[model]
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        composed = compose("config", overrides=["device=cpu", "device.threads=auto", *overrides])
    if arch:
        composed.model.arch = arch
    cfg = validate(composed)
    parts = build_parts(cfg, Path(tempfile.mkdtemp()), None)
    policy = next(h for h in parts.model._forward_pre_hooks.values() if isinstance(h, ThreadPolicy))
    if vocab:
        parts.model.resize_token_embeddings(vocab, mean_resizing=False)
        policy.params = sum(p.numel() for p in parts.model.parameters())

    def steps_of(steps: int) -> float:
        train = dataclasses.replace(cfg.train, max_steps=steps, keep_best=False)
        started = time.perf_counter()
        train_task(TaskRun(parts.ctx, parts.strategy, parts.encoded[0].train, train, lambda tasks: 0.0))
        return (time.perf_counter() - started) / steps

    probe_s = steps_of(2)  # at auto's first choice: fixes the steps per segment for every setting
    for line in sys.stdin:
        setting, seconds = line.split()
        if setting in ("join", "leave"):  # count this worker among the live cl-runs (side by side) or not
            count_this_run(setting == "join")
            print("{}", flush=True)
            continue
        policy.meter.others_busy()  # a new load window: auto chooses from 0.2 s of the machine now
        policy.fixed = None if setting == "auto" else int(setting)
        policy.checked = -math.inf
        threads = policy.update()
        chunk, times = max(1, round(float(seconds) / 4 / probe_s)), []
        while not times or len(times) < 4 and sum(times) * chunk < float(seconds):  # a slow setting stops early
            times.append(steps_of(chunk))
        print(json.dumps({"setting": setting, "threads": threads, "step_s": sum(times) / len(times),
                          "steps": chunk * len(times), "params": policy.params}), flush=True)


# ----------------------------------------------------------------------------------------------- driver side
class Workers:
    """The worker processes of one model, started when first needed: slot a (every load) and slot b (two
    cl-runs side by side; not counted as a live cl-run otherwise), each with OpenMP waiting passively (as
    cl-run sets it) and actively (torch's default before: the "2 spin" column)."""

    def __init__(self, model: str) -> None:
        self.model, self.procs = model, {}

    def get(self, kind: str, slot: str) -> subprocess.Popen:
        if (kind, slot) not in self.procs:
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
            env["OMP_WAIT_POLICY"] = kind.upper()
            self.procs[kind, slot] = subprocess.Popen(
                [sys.executable, __file__, "--worker", self.model], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                text=True, env=env, cwd=Path(__file__).parent.parent)
            if (kind, slot) != ("passive", "a"):
                self.ask([self.procs[kind, slot]], "leave 0")
        return self.procs[kind, slot]

    def ask(self, procs: list[subprocess.Popen], command: str) -> list[dict]:
        for p in procs:
            p.stdin.write(command + "\n")
            p.stdin.flush()
        return [json.loads(p.stdout.readline()) for p in procs]

    def close(self) -> None:
        for p in self.procs.values():
            p.stdin.close()
            p.wait()


def measure_load(workers: Workers, load: str, order: list[str], seconds: float) -> dict[str, dict]:
    """One round of one load: a warm-up segment, then each setting once; returns setting -> result."""
    slots = ["a", "b"] if load == "pair" else ["a"]
    if ("passive", "b") in workers.procs or load == "pair":
        workers.ask([workers.get("passive", "b")], "join 0" if load == "pair" else "leave 0")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
    try:
        out = {}
        for setting in ["1", *order]:
            kind = "active" if setting == "2spin" else "passive"
            procs = [workers.get(kind, slot) for slot in slots]
            answers = workers.ask(procs, f"{setting.replace('spin', '')} {seconds / 3 if not out else seconds}")
            out[setting] = {"step_s": statistics.mean(a["step_s"] for a in answers),
                            "threads": "/".join(str(a["threads"]) for a in answers)}
        return out  # out["1"] holds the warm-up until the measured "1" replaces it
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def bench_model(model: str, rounds: int) -> dict[str, dict[str, list]]:
    results = {load: {s: [] for s in SETTINGS} for load in LOADS}
    workers = Workers(model)
    try:
        for r in range(rounds):
            order = list(SETTINGS[r % len(SETTINGS):] + SETTINGS[:r % len(SETTINGS)])
            for load in (LOADS if r % 2 == 0 else LOADS[::-1]):
                for setting, res in measure_load(workers, load, order, MODELS[model][2]).items():
                    results[load][setting].append(res)
    finally:
        workers.close()
    return results


def table(model: str, results: dict[str, dict[str, list]]) -> list[str]:
    lines = []
    for load, by_setting in results.items():
        med = {s: statistics.median(r["step_s"] for r in rs) for s, rs in by_setting.items() if rs}
        best = min(med.values())
        chosen = ",".join(sorted({r["threads"] for r in by_setting["auto"]}))
        cells = "  ".join(f"{med[s] * 1e3:8.1f} ({med[s] / best:4.2f}x)" for s in SETTINGS)
        lines.append(f"{model:5} {load:6} {cells}   auto chose {chosen}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,5m,135m")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write every measurement as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    print(f"load before: {os.getloadavg()}  cores: {len(os.sched_getaffinity(0))}")
    print(f"{'model':5} {'load':6} " + "  ".join(f"{'ms/step ' + s:>16}" for s in SETTINGS))
    everything = {}
    for model in args.models.split(","):
        everything[model] = bench_model(model, args.rounds)
        print("\n".join(table(model, everything[model])), flush=True)
    print(f"load after: {os.getloadavg()}")
    if args.out:
        args.out.write_text(json.dumps(everything, indent=1) + "\n")


if __name__ == "__main__":
    main()
