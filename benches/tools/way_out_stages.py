#!/usr/bin/env python3
"""A non-streamed response's way out, stage by stage: from `perf script -F
tid,time,event,trace` of syscalls:sys_enter_recvfrom / sys_enter_writev /
sys_enter_write and the uprobes of way_out_probes.sh, recorded on one server process.

For each first write to the client after a read from the upstream, the stages are
the probes hit in between (a `write` is the ledger journal's append), each counted
from its first hit. Prints each stage's median and the whole way out.
See BENCHMARKS.md ("The way out, stage by stage", sixth session) for the commands.
"""
import re,statistics,sys
ev=[]
for l in open(sys.argv[1]):
    m=re.match(r'\s*\d+\s+([\d.]+):\s+(\S+): (.*)',l)
    if not m: continue
    t,e,rest=float(m.group(1)),m.group(2),m.group(3)
    if e.startswith('syscalls:'):
        if 'flags: 0x00000002' in rest: continue
        fd=int(re.search(r'fd: (0x[0-9a-f]+)',rest).group(1),16)
        n=e.rsplit('_',1)[1]
        if n=='write': ev.append((t,'jwrite',None)); continue
        ev.append((t,n,fd))
    else: ev.append((t,e.split(':')[1],None))
role={}
for _,n,fd in ev:
    if fd is not None and fd not in role: role[fd]='C' if n=='recvfrom' else 'U'
st={};order=[];tot=[]
for i,(t,n,fd) in enumerate(ev):
    if n!='writev' or role[fd]!='C': continue
    j=i-1;hits=[]
    while j>=0 and not (ev[j][1]=='recvfrom' and role[ev[j][2]]=='U'):
        if ev[j][2] is None: hits.append(ev[j][:2])
        if ev[j][1]=='writev': break
        j-=1
    if j<0 or ev[j][1]!='recvfrom': continue
    path=[(ev[j][0],'up_read')];seen=set()
    for a,p in reversed(hits):
        if p not in seen: seen.add(p);path.append((a,p))
    path.append((t,'client_write'));tot.append((t-ev[j][0])*1e6)
    for (a,x),(b,y) in zip(path,path[1:]):
        k=x+' -> '+y; st.setdefault(k,[]).append((b-a)*1e6)
        if k not in order: order.append(k)
for k in order: print('%-28s n %4d p50 %6.1f'%(k,len(st[k]),statistics.median(st[k])))
print('total p50 %.0f n %d'%(statistics.median(tot),len(tot)))
