#!/usr/bin/env python3
"""A request's way in, stage by stage: from `perf script -F tid,time,event,trace` of
syscalls:sys_enter_recvfrom / sys_enter_writev and the uprobes of way_in_probes.sh,
recorded on one server process.

For each write of a request to the upstream, the stages are the probes hit since the
request's read from the client, each stage counted from its first hit. Prints each
stage's median and the whole way in (read -> upstream write).
See BENCHMARKS.md ("The way in, stage by stage", fifth session) for the commands.
"""
import re
import statistics
import sys

events = []  # (time, name, fd or None)
for line in open(sys.argv[1]):
    m = re.match(r'\s*\d+\s+([\d.]+):\s+(\S+): (.*)', line)
    if not m:
        continue
    t, event, rest = float(m.group(1)), m.group(2), m.group(3)
    if event.startswith('syscalls:'):
        if 'flags: 0x00000002' in rest:  # MSG_PEEK
            continue
        fd = int(re.search(r'fd: (0x[0-9a-f]+)', rest).group(1), 16)
        events.append((t, event.rsplit('_', 1)[1], fd))
    else:
        events.append((t, re.sub(r'\d+$', '', event.split(':')[1]), None))

# The first syscall on a descriptor says what it is: a read is a client connection.
role = {}
for _, name, fd in events:
    if fd is not None and fd not in role:
        role[fd] = 'client' if name == 'recvfrom' else 'upstream'

stages, order, totals = {}, [], []
for i, (t, name, fd) in enumerate(events):
    if name != 'writev' or role[fd] != 'upstream':
        continue
    j, hits = i - 1, []
    while j >= 0 and not (events[j][1] == 'recvfrom' and role[events[j][2]] == 'client'):
        if events[j][2] is None:
            hits.append(events[j][:2])
        j -= 1
    if j < 0:
        continue
    path, seen = [(events[j][0], 'read')], set()
    for at, probe in reversed(hits):
        if probe not in seen:
            seen.add(probe)
            path.append((at, probe))
    path.append((t, 'upstream write'))
    totals.append((t - events[j][0]) * 1e6)
    for (a, x), (b, y) in zip(path, path[1:]):
        key = f'{x} -> {y}'
        stages.setdefault(key, []).append((b - a) * 1e6)
        if key not in order:
            order.append(key)

for key in order:
    xs = stages[key]
    print(f'{key:30} n {len(xs):5}  p50 {statistics.median(xs):6.1f} µs')
if totals:
    print(f'{"read -> upstream write":30} n {len(totals):5}  p50 {statistics.median(totals):6.1f} µs')
