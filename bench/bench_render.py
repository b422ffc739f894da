"""Chat rendering throughput: in process vs ``--render-workers`` processes.

    python bench/bench_render.py [--copies 10] [--workers 1,2] [--template llama3|tiny]

Renders and tokenises ``--copies`` copies of the bundled sample chats with the built-in
tiny tokenizer, either with its own ChatML template (``{% generation %}`` marks the
answers: one render per chat) or a Llama-3-style template without markers (the common
case for released models: one render per assistant turn). Prints tokens/s in process
(``iter_samples``) and through ``iter_samples_parallel`` with N worker processes, with
the time to the first sample (process start-up, imports, tokenizer load).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from eagle3_target.cli import resolve_model
from eagle3_target.data.chat import ChatEncoder, iter_samples, load_tokenizer, sample_data_path
from eagle3_target.data.render import RenderSpec, iter_samples_parallel

LLAMA3_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=10)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--template", default="llama3", choices=["llama3", "tiny"])
    args = p.parse_args()
    tok_dir = resolve_model(None)
    if args.template == "llama3":
        t = load_tokenizer(tok_dir)
        t.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": LLAMA3_SPECIALS})
        t.chat_template = LLAMA3_TEMPLATE
        tok_dir = tempfile.mkdtemp(prefix="bench-render-")
        t.save_pretrained(tok_dir)
    paths = [str(sample_data_path())] * args.copies
    enc = ChatEncoder(load_tokenizer(tok_dir), max_length=2048)
    t0 = time.perf_counter()
    n = sum(len(s) for s in iter_samples(paths, enc) if hasattr(s, "input_ids"))
    dt = time.perf_counter() - t0
    print(f"template {args.template} (mask from {'the template' if enc.use_template_mask else 'per-turn renders'}), "
          f"{n:,} tokens")
    print("| renderer | seconds | tokens/s | first sample after |")
    print("|---|---:|---:|---:|")
    print(f"| in process | {dt:.2f} | {n / dt:,.0f} | - |")
    for w in (int(x) for x in args.workers.split(",")):
        t0 = time.perf_counter()
        first, m = None, 0
        for s in iter_samples_parallel(RenderSpec(paths=paths, tokenizer_dir=tok_dir, max_length=2048), w):
            if first is None:
                first = time.perf_counter() - t0
            if hasattr(s, "input_ids"):
                m += len(s)
        dt = time.perf_counter() - t0
        assert m == n, (m, n)
        print(f"| {w} worker process(es) | {dt:.2f} | {m / dt:,.0f} | {first:.2f} s |")


if __name__ == "__main__":
    main()
