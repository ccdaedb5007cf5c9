#!/usr/bin/env bash
# Live migration demo: a real redis-server, holding data and serving a client, moves from one host to another with
# its address and the client's very connection (two test hosts made here with network namespaces; needs root).
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root: the demo makes network namespaces"; exit 1; }
source "$(dirname "$0")/../common.sh"
need redis-server:redis-server
work="$(mktemp -d /tmp/vos-migrate-redis.XXXXXX)"
id=$(( $$ % 200 + 20 )); br="vosdemo$id"; net="10.232.$id"; vip="$net.100"

cleanup() {
    for h in a b; do ip netns pids "vosdemo$id$h" 2>/dev/null | xargs -r kill -9; ip netns del "vosdemo$id$h" 2>/dev/null || true; done
    ip link del "$br" 2>/dev/null || true
}
trap cleanup EXIT
echo "== two hosts, a and b, on a bridge; the job's own address $vip starts on a"
ip link add "$br" type bridge && ip addr add "$net.1/24" dev "$br" && ip link set "$br" up
n=2
for h in a b; do
    ns="vosdemo$id$h"
    ip netns add "$ns"
    ip link add "v$id$h" type veth peer name "w$id$h"
    ip link set "v$id$h" master "$br" up
    ip link set "w$id$h" netns "$ns"
    ip -n "$ns" link set "w$id$h" name eth0
    ip -n "$ns" addr add "$net.$n/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    n=$((n + 1))
done
ip -n "vosdemo${id}a" addr add "$vip/24" dev eth0
"$vrun" keygen "$work/key"
for h in a b; do
    ip netns exec "vosdemo$id$h" "$vrun" serve --listen "0.0.0.0:7070" --key "$work/key" --dir "$work/$h" --allow-addr "$net.0/24" > "$work/serve-$h.log" 2>&1 &
    disown
done
echo "== redis-server under vrun on host a"
ip netns exec "vosdemo${id}a" "$vrun" --quiet --name redis --dir "$work" -- \
    redis-server --port 6379 --bind 0.0.0.0 --save "" --appendonly no --protected-mode no --dir "$work" > "$work/redis.out" 2>&1 &
disown
echo "== a client loads 2000 keys, then keeps counting on the same connection while the server moves a -> b"
python3 - "$vip" "$vrun" "$id" "$work" <<'PY'
import socket, subprocess, sys, time
vip, vrun, id, work = sys.argv[1:]
def connect():
    for _ in range(200):
        try:
            return socket.create_connection((vip, 6379), timeout=10)
        except OSError:
            time.sleep(0.05)
    raise SystemExit("redis did not come up")
s = connect(); f = s.makefile("rb")
def cmd(*a):
    s.sendall(("*%d\r\n" % len(a) + "".join("$%d\r\n%s\r\n" % (len(str(x)), x) for x in a)).encode())
    l = f.readline().decode().rstrip()
    return f.readline().decode().rstrip() if l.startswith("$") and l != "$-1" else l[1:]
for i in range(2000):
    assert cmd("SET", f"key:{i}", i) == "OK"
n = 0
def count(k):
    global n
    for _ in range(k):
        n += 1
        got = cmd("INCR", "counter")
        assert got == str(n), f"request {n} answered {got}: lost or repeated"
count(500)
t = time.time()
m = subprocess.run(["ip", "netns", "exec", f"vosdemo{id}a", vrun, "migrate", "redis", "--to", f"{vip.rsplit('.', 1)[0]}.3:7070",
                    "--key", f"{work}/key", "--move-addr", f"{vip}/24", "--tcp-established"], capture_output=True, text=True)
print("  " + m.stderr.strip().splitlines()[-1])
assert m.returncode == 0, m.stderr
count(500)
print(f"  the same connection went on: counter {n}, no request lost or repeated")
bad = [i for i in range(2000) if cmd("GET", f"key:{i}") != str(i)]
assert not bad, f"keys lost: {bad[:5]}"
print("  all 2000 keys are there on host b")
PY
grep -q "runs here" "$work/serve-b.log"
echo "== ok: redis moved from host a to host b with its data, its address and its client's connection"
