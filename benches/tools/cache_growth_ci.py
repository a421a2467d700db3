#!/usr/bin/env python3
"""The cache's all-miss growth with a confidence interval, from a saved
`loadbench --cache --misses-only` output (run 3 and 3b; `--aa` outputs too).

Each round is a pair of steps back to back (cache on / off, order alternating);
its own growth is on / off - 1. Printed per rate and for saturation: the growth of
the medians (what loadbench prints), the median of the rounds' own growth, and a
90 % bootstrap interval of that median (5,000 resamples of the rounds, seed 1).

Usage: loadbench --cache --misses-only --secs 4 --repeat 15 > out.txt
       python3 benches/tools/cache_growth_ci.py out.txt
"""
import random
import statistics as st
import sys

ON = ("on (all miss)", "off (A/A)")  # the second step of an A/A run counts as "on"


def rows(path):
    for line in open(path):
        if line.startswith("|"):
            yield [c.strip() for c in line.strip().strip("|").split("|")]


def main(path):
    fixed, sat = {}, []
    for r in rows(path):
        if not r[0].isdigit() or r[1] not in ("off",) + ON:
            continue
        step = "on" if r[1] in ON else "off"
        if len(r) >= 9:  # run 3: rate, cache, ok, err, p50, CPU µs/req, …
            fixed.setdefault(r[0], []).append((step, float(r[5])))
        elif len(r) == 5:  # run 3b: round, cache, req/s, CPU µs/req, cs/req
            sat.append((step, float(r[3])))
    for name, seq in [*fixed.items(), ("saturation", sat)]:
        on, off, own = [], [], []
        for i in range(0, len(seq) - 1, 2):
            pair = dict(seq[i : i + 2])
            if len(pair) == 2:
                on.append(pair["on"])
                off.append(pair["off"])
                own.append(pair["on"] / pair["off"] - 1)
        if not own:
            continue
        random.seed(1)
        boot = sorted(st.median(random.choices(own, k=len(own))) for _ in range(5000))
        print(
            f"{name}: {len(own)} rounds; growth of the medians "
            f"{100 * (st.median(on) / st.median(off) - 1):+.1f} %, median of the rounds' own "
            f"{100 * st.median(own):+.1f} % (90 % interval {100 * boot[250]:+.1f} … "
            f"{100 * boot[4750]:+.1f} %)"
        )


if __name__ == "__main__":
    main(sys.argv[1])
