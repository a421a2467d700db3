#!/usr/bin/env python3
"""What one 330-byte journal append costs on a cold CPU (2 ms idle before each),
by way of writing: O_APPEND write, pwrite into preallocated space, a copy into a
shared memory map. Run in the directory of the store, pinned: `taskset -c 1
benches/tools/append_cost.py`. See BENCHMARKS.md (what is left, fifth session).
"""
import mmap
import os
import statistics
import tempfile
import time

import shutil

scratch = tempfile.mkdtemp(dir='.')
os.chdir(scratch)
line=b'x'*329+b'\n'; N=400
def bench(name,setup,op):
    f=setup(); ds=[]
    for i in range(N):
        time.sleep(0.002)
        t=time.perf_counter_ns(); op(f,i); ds.append((time.perf_counter_ns()-t)/1000)
    print('%-28s p50 %.1f p90 %.1f µs'%(name,statistics.median(ds),sorted(ds)[int(N*.9)]))
def s_append():
    p='a.log'; 
    if os.path.exists(p): os.remove(p)
    return os.open(p,os.O_WRONLY|os.O_CREAT|os.O_APPEND,0o644)
bench('append (growing file)',s_append,lambda fd,i: os.write(fd,line))
def s_pre():
    p='b.log'
    if os.path.exists(p): os.remove(p)
    fd=os.open(p,os.O_RDWR|os.O_CREAT,0o644); os.write(fd,b'\0'*(N*len(line))); os.fsync(fd); return fd
bench('pwrite into written zeros',s_pre,lambda fd,i: os.pwrite(fd,line,i*len(line)))
def s_falloc():
    p='c.log'
    if os.path.exists(p): os.remove(p)
    fd=os.open(p,os.O_RDWR|os.O_CREAT,0o644); os.posix_fallocate(fd,0,N*len(line)); return fd
bench('pwrite into fallocated',s_falloc,lambda fd,i: os.pwrite(fd,line,i*len(line)))
def s_mmap():
    p='d.log'
    if os.path.exists(p): os.remove(p)
    fd=os.open(p,os.O_RDWR|os.O_CREAT,0o644); os.ftruncate(fd,N*len(line)); return mmap.mmap(fd,N*len(line))
def mm(m,i): m[i*len(line):(i+1)*len(line)]=line
bench('mmap copy',s_mmap,mm)
def nop(f,i): pass
bench('nothing (timer floor)',lambda:None,nop)
os.chdir('..')
shutil.rmtree(scratch)
