# A mixed concurrent load that, on this 2-core machine, left a connection without replies for good in
# about half of the runs, before `Shard.settled()` checked and joined under one lock (found by review
# during issue #8; tests/integration/test_fairness.py runs it twice): start a server with `stockade serve --port PORT --data-dir DIR --shards 8 --io-threads 3`,
# then `python3 scripts/stall/mixed_load.py PORT 20 SEED` (seeds 3 and 6 stalled). Many connections
# pipeline mostly sold-out DEDUCT / RESERVE / STOCK mixes while others restock, pause, cancel, confirm,
# let short holds expire and place cross-shard baskets; a pipeline with no reply for 10 s is reported
# as a STALL. Then every acknowledged reply is audited against STOCK, AUDIT and ORDER.
import sys, threading, time, random, queue, collections
sys.path.insert(0, __import__("os").path.dirname(__file__))
from resp import Conn, Err, stockmap
port=int(sys.argv[1]); dur=float(sys.argv[2]); seed=int(sys.argv[3]) if len(sys.argv)>3 else 1
SKUS=["h%d"%i for i in range(8)]
L1=["l%d"%i for i in range(4)]   # linearizability SKUs: only one deductor each
c0=Conn(port)
for s in SKUS+L1: assert c0.cmd("SKU.ADD",s,"0")=="OK"
lock=threading.Lock()
acc={s:collections.Counter() for s in SKUS+L1}  # restocked, deducted, paid_units
orders=queue.Queue(); orderinfo={}  # id -> {sku:qty}
violations=[]; stats=collections.Counter(); errors=collections.Counter()
stop=time.time()+dur
def note_err(x): 
    with lock: errors[str(x)[:60]]+=1
def buyer(i):
    rnd=random.Random(seed*1000+i); c=Conn(port)
    while time.time()<stop:
        cmds=[]
        sku=rnd.choice(SKUS)
        for _ in range(rnd.randrange(1,48)):
            if rnd.random()<0.15: sku=rnd.choice(SKUS)
            p=rnd.random()
            if p<0.5: cmds.append(("DEDUCT",sku,str(rnd.choice([1,1,1,2,3]))))
            elif p<0.9: cmds.append(("RESERVE","b%d"%i,sku,str(rnd.choice([1,1,2])),"TTL",str(rnd.choice([50,150,400]))))
            else: cmds.append(("STOCK",sku))
        c.sock.settimeout(10)
        t0=time.time()
        try: rs=c.pipe(cmds)
        except Exception as e:
            got=c.buf[c.pos:]
            with lock: violations.append(("STALL buyer %d"%i, repr(e), "cmds", len(cmds), cmds[:6], "partial", got[:200], "at", time.time()-t0))
            c.sock.settimeout(15)
            try:
                w=Conn(port); t1=time.time()
                for k in range(3): w.cmd("SKU.ADD","wake%d_%d_%f"%(i,k,time.time()),"1"); time.sleep(0.2)
                c.sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                first=c.reply()
                with lock: violations.append(("STALL: after a PING on the stalled connection, (after 3 logged SKU.ADDs on another connection) first reply came after %.3fs: %r"%(time.time()-t1,str(first)[:40]),))
            except Exception as e3:
                with lock: violations.append(("STALL: PING on stalled connection unanswered too",repr(e3)))
            c.sock.settimeout(60)
            try:
                rest=[c.reply() for _ in cmds]   # may be off if some were read; only to see if it ever answers
                with lock: violations.append(("STALL resolved after", time.time()-t0))
            except Exception as e2:
                with lock: violations.append(("STALL never resolved", repr(e2)))
            return
        with lock:
            for cm,r in zip(cmds,rs):
                if cm[0]=="DEDUCT":
                    if r==1: acc[cm[1]]["deducted"]+=int(cm[2]); stats["deduct1"]+=1
                    elif r==0: stats["deduct0"]+=1
                    else: errors["D "+str(r)[:50]]+=1
                elif cm[0]=="RESERVE":
                    if isinstance(r,bytes): orderinfo[r]={cm[2]:int(cm[3])}; orders.put(r); stats["held"]+=1
                    elif isinstance(r,Err) and (r.startswith("SOLDOUT") or r.startswith("INSUFFICIENT") or r.startswith("PAUSED")): stats[r.split()[0]]+=1
                    else: errors["R "+str(r)[:50]]+=1
                else:
                    m=stockmap(r)
                    if m["available"]<0 or m["available"]+m["reserved"]+m["sold"]!=m["total"]: violations.append(("stock",cm,m))
def restocker(i):
    rnd=random.Random(seed*77+i); c=Conn(port)
    while time.time()<stop:
        s=rnd.choice(SKUS); d=rnd.choice([1,1,2,3])
        if rnd.random()<0.3:
            # restock then, in the same pipeline, sold-out-prone commands on the same SKU
            rs=c.pipe([("SKU.RESTOCK",s,str(d)),("DEDUCT",s,"1"),("RESERVE","r%d"%i,s,"1","TTL","100")])
            with lock:
                if isinstance(rs[0],Err): errors["RS "+rs[0][:40]]+=1; continue
                acc[s]["restocked"]+=d
                if rs[1]==1: acc[s]["deducted"]+=1
                elif rs[1]==0: violations.append(("restock-then-deduct0",s,d,rs))
                if isinstance(rs[2],bytes): orderinfo[rs[2]]={s:1}; orders.put(rs[2])
        else:
            r=c.cmd("SKU.RESTOCK",s,str(d))
            with lock:
                if isinstance(r,Err): errors["RS "+r[:40]]+=1
                else: acc[s]["restocked"]+=d
        time.sleep(rnd.random()*0.002)
def settler(i):
    rnd=random.Random(seed*55+i); c=Conn(port)
    while time.time()<stop+0.5:
        try: o=orders.get(timeout=0.2)
        except queue.Empty: continue
        if rnd.random()<0.3: continue  # let it expire
        v="CONFIRM" if rnd.random()<0.5 else "CANCEL"
        # mix with a sold-out deduct on the order's sku in the same pipeline
        sku=list(orderinfo[o])[0]
        rs=c.pipe([("DEDUCT",sku,"1"),(v,o),("DEDUCT",sku,"1")])
        with lock:
            for k in (0,2):
                if rs[k]==1: acc[sku]["deducted"]+=1
            if v=="CANCEL" and rs[1]=="CANCELLED" and rs[2]==0 and False: pass
            if rs[1]=="PAID":
                for s,q in orderinfo[o].items(): acc[s]["paid"]+=q
            elif rs[1] in ("CANCELLED",) or (isinstance(rs[1],Err) and rs[1].startswith("EXPIRED")): stats[v+str(rs[1])[:9]]+=1
            else: errors["S "+str(rs[1])[:40]]+=1
def pauser():
    rnd=random.Random(seed*9); c=Conn(port)
    while time.time()<stop:
        s=rnd.choice(SKUS)
        c.pipe([("SKU.PAUSE",s),("DEDUCT",s,"1"),("SKU.RESUME",s)])  # paused: DEDUCT 0
        time.sleep(0.003)
def basket(i):
    rnd=random.Random(seed*31+i); c=Conn(port)
    while time.time()<stop:
        a,b=rnd.sample(SKUS,2)
        rs=c.pipe([("BUY","k%d"%i,a,"1",b,"1","TTL",str(rnd.choice([80,300]))),("DEDUCT",a,"1"),("DEDUCT",b,"1")])
        with lock:
            if isinstance(rs[0],bytes): orderinfo[rs[0]]={a:1,b:1}; orders.put(rs[0]); stats["basket"]+=1
            for s,r in ((a,rs[1]),(b,rs[2])):
                if r==1: acc[s]["deducted"]+=1
def l1(i):
    # only this thread deducts l_i; a restocker thread restocks 1 and waits for its ack.
    sku=L1[i]; rc=Conn(port); dc=Conn(port); acked=[0]; done=[0]
    def rs():
        while time.time()<stop:
            r=rc.cmd("SKU.RESTOCK",sku,"1")
            if not isinstance(r,Err):
                with lock: acked[0]+=1; acc[sku]["restocked"]+=1
            time.sleep(0.0005)
    t=threading.Thread(target=rs); t.start()
    got=0
    while time.time()<stop:
        with lock: a=acked[0]
        k=random.randrange(1,40)
        r=dc.pipe([("DEDUCT",sku,"1")]*k)
        n=sum(1 for x in r if x==1)
        if a>got and r[0]!=1: violations.append(("L1 first deduct not 1 though restocks acked before send",sku,a,got,r[:3]))
        got+=n
        with lock: acc[sku]["deducted"]+=n; stats["l1pipes"]+=1
    t.join()
lat=[]
def pinger():
    cs=[Conn(port) for _ in range(4)]
    while time.time()<stop:
        for c in cs:
            t=time.time(); c.cmd("PING"); lat.append(time.time()-t)
        time.sleep(0.01)
ts=[threading.Thread(target=buyer,args=(i,)) for i in range(16)]+[threading.Thread(target=restocker,args=(i,)) for i in range(3)]
ts+=[threading.Thread(target=settler,args=(i,)) for i in range(2)]+[threading.Thread(target=pauser),threading.Thread(target=pinger)]
ts+=[threading.Thread(target=basket,args=(i,)) for i in range(2)]+[threading.Thread(target=l1,args=(i,)) for i in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
time.sleep(1.0)  # every hold's TTL passed
c=Conn(port)
for s in SKUS+L1: c.cmd("DEDUCT",s,"1000000000")  # triggers expiry on the shard; answers 0
bad=[]
for s in SKUS+L1:
    m=stockmap(c.cmd("STOCK",s)); a=acc[s]
    exp_total=a["restocked"]; exp_sold=a["deducted"]+a["paid"]
    if m["total"]!=exp_total or m["sold"]!=exp_sold or m["reserved"]!=0 or m["available"]!=exp_total-exp_sold:
        bad.append((s,m,dict(a)))
aud=c.cmd("AUDIT")
print("stats",dict(stats)); print("errors",dict(errors))
print("violations",len(violations),violations[:5]); print("accounting mismatches",bad)
print("audit", [x for x in aud if x not in (b"OK",)][:20] if isinstance(aud,list) else aud)
lat.sort(); print("ping n=%d p50=%.2fms p99=%.2fms max=%.2fms"%(len(lat),lat[len(lat)//2]*1e3,lat[int(len(lat)*.99)]*1e3,lat[-1]*1e3))
# every acked order still there
missing=0
for o in list(orderinfo)[:3000]:
    r=c.cmd("ORDER",o)
    if isinstance(r,Err): missing+=1
print("orders checked",min(len(orderinfo),3000),"missing",missing)
