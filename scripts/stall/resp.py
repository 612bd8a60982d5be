# A minimal RESP client for scripts/stall/mixed_load.py (pipelines, replies parsed by type).
import socket
def enc(*args):
    out=[b"*%d\r\n"%len(args)]
    for a in args:
        a=a if isinstance(a,bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n"%(len(a),a))
    return b"".join(out)
class Conn:
    def __init__(s,port,timeout=30):
        s.sock=socket.create_connection(("127.0.0.1",port)); s.sock.settimeout(timeout); s.buf=b""; s.pos=0
    def _fill(s):
        d=s.sock.recv(262144)
        if not d: raise EOFError("closed")
        if s.pos: s.buf=s.buf[s.pos:]; s.pos=0
        s.buf+=d
    def line(s):
        while True:
            i=s.buf.find(b"\r\n",s.pos)
            if i>=0: l=s.buf[s.pos:i]; s.pos=i+2; return l
            s._fill()
    def exact(s,n):
        while len(s.buf)-s.pos<n: s._fill()
        b=s.buf[s.pos:s.pos+n]; s.pos+=n; return b
    def reply(s):
        l=s.line(); t=l[:1]
        if t==b"+": return l[1:].decode()
        if t==b"-": return Err(l[1:].decode())
        if t==b":": return int(l[1:])
        if t==b"$":
            n=int(l[1:]); 
            if n<0: return None
            b=s.exact(n+2)[:-2]; return b
        if t==b"*":
            n=int(l[1:]); return None if n<0 else [s.reply() for _ in range(n)]
        if t==b"%":
            n=int(l[1:]); return dict((s.reply(),s.reply()) for _ in range(n))
        if t==b"_": return None
        return l
    def pipe(s,cmds):
        s.sock.sendall(b"".join(enc(*c) for c in cmds))
        return [s.reply() for _ in cmds]
    def cmd(s,*c): return s.pipe([c])[0]
class Err(str):
    pass
def stockmap(r):
    if isinstance(r,dict): return {k.decode() if isinstance(k,bytes) else k:v for k,v in r.items()}
    d={}
    for i in range(0,len(r),2):
        k=r[i].decode() if isinstance(r[i],bytes) else r[i]; v=r[i+1]
        d[k]=v
    return d
