#!/usr/bin/env python3
"""A request's path across processes, hop by hop, from a system-wide
`perf record -a -e syscalls:sys_enter_writev,syscalls:sys_enter_recvfrom,syscalls:sys_exit_recvfrom`
taken while `loadbench rate ADDR 200 2 stream` runs (requests then rarely overlap),
read with `perf script -F pid,tid,time,event,trace`.

Usage: request_hops.py PERF_SCRIPT_TEXT SERVER_PID UPSTREAM_PID
(every other process is the client). Per request: client write -> server read (the
server's wake-up), the server's way in, server write -> upstream read, the
upstream, upstream write -> server read, the server's way out (to its first write
of the response), server write -> client read. Prints each hop's median.
See BENCHMARKS.md ("Time to first byte, hop by hop", fifth session).
"""
import re
import statistics
import sys

server, upstream = int(sys.argv[2]), int(sys.argv[3])
events, reading = [], {}
for line in open(sys.argv[1]):
    m = re.match(r'\s*(\d+)/(\d+)\s+([\d.]+):\s+syscalls:sys_(enter|exit)_(\w+): (.*)', line)
    if not m:
        continue
    pid, tid, t, edge, call, rest = m.groups()
    pid, t = int(pid), float(m.group(3))
    who = 'server' if pid == server else 'upstream' if pid == upstream else 'client'
    if edge == 'enter':
        if 'flags: 0x00000002' in rest:  # MSG_PEEK
            continue
        if call == 'writev':
            events.append((t, who, 'write'))
        else:
            reading[tid] = t
    else:
        n = int(rest.strip(), 16)
        if 0 < n < 2**62 and tid in reading:  # a read that returned bytes, at its start
            events.append((reading.pop(tid), who, 'read'))
events.sort()

path = [('client', 'write'), ('server', 'read'), ('server', 'write'), ('upstream', 'read'),
        ('upstream', 'write'), ('server', 'read'), ('server', 'write'), ('client', 'read')]
hops = ['client write -> server read', "server's way in", 'server write -> upstream read',
        'upstream', 'upstream write -> server read', "server's way out",
        'server write -> client read']
times = [[] for _ in hops]
for i, (t, who, what) in enumerate(events):
    if (who, what) != path[0]:
        continue
    at, step = [t], 1
    for later in events[i + 1:]:
        if step == len(path):
            break
        if later[1:] == path[step]:
            at.append(later[0])
            step += 1
    if step == len(path) and at[-1] - at[0] < 0.004:
        for h in range(len(hops)):
            times[h].append((at[h + 1] - at[h]) * 1e6)
for name, xs in zip(hops, times):
    if xs:
        print(f'{name:32} n {len(xs):4}  p50 {statistics.median(xs):6.1f} µs')
