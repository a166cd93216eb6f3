"""transformers' generate on gateloop models: the time per new token as the context grows.

    python benchmarks/bench_hf_generate.py [--mixers gateloop hgrn transformer] [--contexts 128 1024 4096]

Each mixer's model (d_model 128, 4 layers, random weights: speed does not depend on them) runs
GateLoopForCausalLM.generate, greedy, on a prompt of each context length. The time per token is the
decode time alone: (time for 1 + N new tokens - time for 1) / N, medians of --repeat runs. With the
recurrent state in GateLoopCache, a recurrent mixer's time per token stays flat as the context
grows; the Transformer's KV cache makes each step attend over the whole context. --no-cache adds the
same measurement with use_cache=False (generate re-reads the whole sequence every step), at the
shorter contexts only. Written to benchmarks/out/hf_generate.csv.
"""

from __future__ import annotations

import argparse

import torch
from _timing import median_time, print_table, write_csv

from gateloop.hf import GateLoopConfig, GateLoopForCausalLM

SMALL_HEADS = {"transformer": {"head_dim": 32}, "fox": {"head_dim": 32}, "hgrn2": {"head_dim": 32}}


def per_token_seconds(model, prompt: torch.Tensor, new: int, repeat: int, use_cache: bool = True) -> float:
    def run(n):
        # An explicit mask: without one, generate would take every pad id in the prompt for padding.
        return lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, use_cache=use_cache, pad_token_id=255)
    return (median_time(run(1 + new), repeat=repeat) - median_time(run(1), repeat=repeat)) / new


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mixers", nargs="+", default=["gateloop", "hgrn", "transformer"])
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-cache", action="store_true", help="also time use_cache=False at contexts <= 1024")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for mixer in args.mixers:
        torch.manual_seed(0)
        config = GateLoopConfig(mixer=mixer, d_model=args.d_model, n_layers=args.n_layers,
                                mixer_options=SMALL_HEADS.get(mixer, {}))
        model = GateLoopForCausalLM(config).eval()
        for T in args.contexts:
            prompt = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(T))
            row = {"mixer": mixer, "context": T,
                   "ms_per_token": 1e3 * per_token_seconds(model, prompt, args.new_tokens, args.repeat)}
            if args.no_cache:
                row["ms_per_token_no_cache"] = (1e3 * per_token_seconds(model, prompt, args.new_tokens, 1, False)
                                                if T <= 1024 else float("nan"))
            rows.append(row)
            print(f"{mixer} context {T}: {row['ms_per_token']:.2f} ms/token", flush=True)
    print_table(rows)
    print(f"written: {write_csv(rows, 'hf_generate.csv')}")


if __name__ == "__main__":
    main()
