"""Benchmark cl-runner's greedy generation (what scoring generates with) against Hugging Face ``model.generate``.

Both generate greedily from the same model, on the same batches (the prompts sorted by length and cut into
``--batch`` examples, as scoring batches them; left padding), with the same ``--max-new-tokens`` and the same
EOS; every generated row is compared token for token (the script exits 1 if any differs). Reported per size:
examples/s of each (the median over ``--rounds`` alternating rounds, after a warm-up of each), the ratio
cl-runner / HF, the mean tokens generated per example and the number of rows that differ.

EOS (``--eos``): ``common`` (default) is the token the model generates most often in a first free pass, so rows
end at different steps as real answers do and a finished row's cost matters; ``none`` is a token the model never
picks, so every row runs the whole budget.

Sizes (random weights from a config, nothing downloaded; ``--model PATH`` for a local model instead): ``tiny``
(conf/model/tiny.yaml's GPT-2), ``gpt2`` (GPT-2 small's shape, 124M). CUDA: bf16 weights for both contenders;
CPU: fp32. Prompts: ``--examples`` random-token prompts of ``--min-len`` to ``--max-len`` tokens.

    python scripts/bench_generation.py                                  # tiny and gpt2
    python scripts/bench_generation.py --sizes tiny --examples 16 --max-new-tokens 8 --rounds 1
    python scripts/bench_generation.py --sizes gpt2 --max-new-tokens 256 --batch 32 --out bench_generation.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from contextlib import nullcontext

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config, GPT2LMHeadModel

from cl_runner.config.schema import EvalConfig
from cl_runner.models.generation import left_pad
from cl_runner.models.kinds import kind_of
from cl_runner.scoring.evaluate import Scorer, greedy_generate

SIZES = {
    "tiny": {"n_layer": 2, "n_embd": 128, "n_head": 2, "n_positions": 512, "vocab_size": 1000, "bos_token_id": 0,
             "eos_token_id": 0},
    "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257},
}


def build(size: str, model_path: str | None, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    if model_path:
        model = AutoModelForCausalLM.from_pretrained(model_path)
    else:
        model = GPT2LMHeadModel(GPT2Config(**SIZES[size], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_generate(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, eos: int,
                pad: int, device: torch.device) -> list[list[int]]:
    """``model.generate`` (greedy) on one left-padded batch; each row cut before its first EOS."""
    ids, mask = left_pad(prompts, pad, device)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                              pad_token_id=pad)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    rows = out[:, ids.shape[1]:].tolist()
    return [row[: row.index(eos)] if eos in row else row for row in rows]


def run_size(size: str, args: argparse.Namespace, device: torch.device) -> dict:
    model = build(size, args.model, device)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, vocab, (int(torch.randint(args.min_len, args.max_len + 1, (1,), generator=gen)),),
                             generator=gen).tolist() for _ in range(args.examples)]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # scoring's batches: by length
    batches = [[prompts[i] for i in order[k : k + args.batch]] for k in range(0, len(order), args.batch)]
    scorer = Scorer(model=model, pad_id=0, eos_id=vocab - 1, device=device, autocast=nullcontext,
                    batch_size=args.batch, cfg=EvalConfig(), decode=str, kind=kind_of(model))
    if args.eos == "common":  # a free pass (vocab - 1 never picked): the most generated token becomes EOS
        free = [t for batch in batches for row in greedy_generate(scorer, batch, args.max_new_tokens) for t in row]
        scorer.eos_id = Counter(free).most_common(1)[0][0] if free else vocab - 1
    eos = scorer.eos_id

    def ours() -> list[list[int]]:
        return [row for batch in batches for row in greedy_generate(scorer, batch, args.max_new_tokens)]

    def hf() -> list[list[int]]:
        return [row for batch in batches for row in hf_generate(model, batch, args.max_new_tokens, eos, 0, device)]

    contenders = {"cl_runner": ours, "hf_generate": hf}
    outputs = {name: fn() for name, fn in contenders.items()}  # warm-up, and the outputs compared
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
    speed = {name: args.examples / statistics.median(s) for name, s in seconds.items()}
    differ = sum(a != b for a, b in zip(outputs["cl_runner"], outputs["hf_generate"], strict=True))
    return {"size": args.model or size, "device": str(device), "dtype": str(next(model.parameters()).dtype),
            "examples": args.examples, "batch": args.batch, "max_new_tokens": args.max_new_tokens, "eos": args.eos,
            "mean_new_tokens": sum(map(len, outputs["cl_runner"])) / args.examples,
            "examples_per_s": speed, "ratio": speed["cl_runner"] / speed["hf_generate"], "rows_differing": differ}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,gpt2", help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--model", default=None, help="a local causal LM directory instead of the sizes")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--min-len", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--eos", choices=["common", "none"], default="common")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = [run_size(size, args, device) for size in ([args.model] if args.model else args.sizes.split(","))]
    print(f"torch threads {torch.get_num_threads()} · {device} · load average {os.getloadavg()[0]:.2f}")
    print(f"{'size':>10} {'batch':>5} {'new':>5} {'mean new':>8} {'cl-runner ex/s':>15} {'HF ex/s':>10} "
          f"{'ratio':>6} {'rows differing':>15}")
    for r in results:
        s = r["examples_per_s"]
        print(f"{r['size']:>10} {r['batch']:>5} {r['max_new_tokens']:>5} {r['mean_new_tokens']:>8.1f} "
              f"{s['cl_runner']:>15.1f} {s['hf_generate']:>10.1f} {r['ratio']:>6.2f} {r['rows_differing']:>15}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return 1 if any(r["rows_differing"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
