#!/usr/bin/env python3
"""Where a proxied request spends its time between syscalls, from `perf script` of
syscalls:sys_enter_writev and syscalls:sys_enter_recvfrom on one server process.

Per request: the request read -> the upstream request write (the ingress path),
the upstream wait, and the upstream answer read -> the first write to the client.
See BENCHMARKS.md ("What the profile shows is left", fourth session) for the commands.
"""
import sys,re
role={}
ev=[]
for l in open(sys.argv[1]):
    m=re.match(r'\s*(\d+)\s+([\d.]+):\s+syscalls:sys_enter_(\w+): fd: (0x[0-9a-f]+)(.*)',l)
    if not m: continue
    t=float(m.group(2)); call=m.group(3); fd=int(m.group(4),16); rest=m.group(5)
    if 'flags: 0x00000002' in rest: continue  # MSG_PEEK
    if fd not in role: role[fd]='C' if call=='recvfrom' else 'U'
    ev.append((t,call,fd))
a=[];b=[];c=[]
i=0
n=len(ev)
for i,(t,call,fd) in enumerate(ev):
    if call=='writev' and role[fd]=='U':
        # t0: last client recvfrom before
        t0=None; cfd=None
        for j in range(i-1,-1,-1):
            if ev[j][1]=='recvfrom' and role[ev[j][2]]=='C': t0=ev[j][0]; cfd=ev[j][2]; break
        # t3: first writev on cfd after
        t3=None
        for j in range(i+1,n):
            if ev[j][1]=='writev' and ev[j][2]==cfd: t3=ev[j][0]; k=j; break
        if t0 is None or t3 is None: continue
        t2=None
        for j in range(k-1,i,-1):
            if ev[j][1]=='recvfrom' and ev[j][2]==fd: t2=ev[j][0]; break
        if t2 is None: continue
        a.append((t-t0)*1e6); b.append((t2-t)*1e6); c.append((t3-t2)*1e6)
def q(x,p): x=sorted(x); return x[int(len(x)*p)] if x else 0
print('%-18s n %4d  request read -> upstream write p50 %4.0f p90 %4.0f | upstream wait p50 %4.0f | upstream read -> client write p50 %4.0f p90 %4.0f µs'%(sys.argv[1],len(a),q(a,.5),q(a,.9),q(b,.5),q(c,.5),q(c,.9)))
