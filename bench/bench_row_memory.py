"""What one data row costs in memory to render and tokenise, by its size: the measurement
behind the dump's row-size cap (``--max-row-mb``), as a Markdown table.

    python bench/bench_row_memory.py [--model DIR] [--mb 0.25 1 4]

Each size runs in a fresh process: one chat row whose assistant turn is that many MB of
text is read, rendered with the model's chat template and tokenised exactly as the dump
does (``--max-length 0``: nothing truncated); the table gives the process's peak RSS
before and after, and the growth as a multiple of the row's size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, random, resource, sys
from eagle3_target.tiny import resolve_model
from eagle3_target.data.tokenizer import load_tokenizer
from eagle3_target.data.chat import ChatEncoder
from eagle3_target.data.samples import encode_row
from eagle3_target.data.rows import RawRow
model, mb = sys.argv[1] or None, float(sys.argv[2])
enc = ChatEncoder(load_tokenizer(resolve_model(model)), max_length=None)
rng = random.Random(0)
words = ["alpha", "beta", "gamma", "delta", "caf\u00e9", "na\u00efve", "x1", "the", "of"]
text = " ".join(rng.choice(words) for _ in range(int(mb * 1e6 / 5)))
line = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
item = encode_row(RawRow(0, "row:1", value=json.loads(line)), enc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"bytes": len(line), "before": before, "after": after, "tokens": len(getattr(item, "input_ids", []))}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="model folder (default: the built-in tiny model)")
    ap.add_argument("--mb", type=float, nargs="+", default=[0.25, 1.0, 4.0], help="row sizes in MB")
    args = ap.parse_args()
    print("| row | tokens | peak RSS before | after | growth / row size |")
    print("|---|---|---|---|---|")
    for mb in args.mb:
        r = subprocess.run([sys.executable, "-c", CHILD, args.model, str(mb)], capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return 1
        m = json.loads(r.stdout.strip().splitlines()[-1])
        grow = m["after"] - m["before"]
        print(f"| {m['bytes'] / 1e6:.2f} MB | {m['tokens']:,} | {m['before'] / 2**20:,.0f} MiB | "
              f"{m['after'] / 2**20:,.0f} MiB | {grow / m['bytes']:.0f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
