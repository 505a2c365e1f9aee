#!/usr/bin/env python3
"""Traffic probes for lifecycle scenarios (run inside a bed host).

  flow.py tcp-server PORT
  flow.py tcp-client ADDR PORT SECONDS   one long-lived TCP connection: a line
      every 20 ms, echoed back; prints "sent= received= max_stall_ms= error="
      and exits 1 on a reset or a stall (no echo) longer than 1 s.
  flow.py udp-server PORT SECONDS        counts sequence-numbered datagrams
  flow.py udp-client ADDR PORT SECONDS   sends one every 10 ms, prints "sent="
      the server prints "received= lost= max_seq= gaps=" (lost = gaps in
      1..max_seq; datagrams lost after max_seq show as max_seq < the client's
      sent; gaps = the first missing runs, as FIRST-LAST@SECONDS, where
      SECONDS is when the datagram after the run arrived, since the server
      started); the client adds "send_errors=" (errno names and counts).
"""
import errno
import signal
import socket
import sys
import time

# SIGTERM ends a flow early, with its summary (SIGINT is ignored in
# background jobs of a non-interactive shell, so it cannot be used).
STOP = False


def _stop(*_):
    global STOP
    STOP = True


signal.signal(signal.SIGTERM, _stop)


def family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def tcp_server(port):
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("::", port))
    srv.listen(1)
    conn, _ = srv.accept()
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return 0
            conn.sendall(data)


def tcp_client(addr, port, seconds):
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect((addr, port))
    end = time.monotonic() + seconds
    sent = received = 0
    last_echo = next_send = time.monotonic()
    max_stall = 0.0
    buf = b""
    error = ""
    try:
        while time.monotonic() < end and not STOP:
            now = time.monotonic()
            if now >= next_send:
                s.sendall(b"%d\n" % sent)
                sent += 1
                # Paced, not as fast as echoes return: a busy loop would
                # starve the agents of CPU in the emulated VM.
                next_send = now + 0.02
            # Wait for echoes until the next line is due.
            s.settimeout(max(0.001, next_send - time.monotonic()))
            try:
                data = s.recv(65536)
                if not data:
                    error = "closed"
                    break
                buf += data
                n = buf.count(b"\n")
                if n:
                    received += n
                    buf = buf[buf.rfind(b"\n") + 1:]
                    last_echo = time.monotonic()
            except socket.timeout:
                pass
            max_stall = max(max_stall, time.monotonic() - last_echo)
    except OSError as e:
        error = type(e).__name__
    print(f"sent={sent} received={received} max_stall_ms={int(max_stall * 1000)} error={error or 'none'}")
    return 1 if error or max_stall > 1.0 else 0


def udp_server(port, seconds):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.settimeout(0.5)
    seen = set()
    start = time.monotonic()
    end = start + seconds
    top = 0
    gaps = []  # (first, last, seconds) of each run jumped over, in order
    while time.monotonic() < end and not STOP:
        try:
            data, _ = s.recvfrom(64)
            seq = int(data)
        except (socket.timeout, ValueError):
            continue
        seen.add(seq)
        if seq > top + 1:
            gaps.append((top + 1, seq - 1, time.monotonic() - start))
        top = max(top, seq)
    # A run filled in later (reordering) is not a gap.
    holes = [(a, b, t) for a, b, t in gaps if any(k not in seen for k in range(a, b + 1))]
    shown = ",".join(f"{a}-{b}@{t:.1f}" for a, b, t in holes[:8]) or "none"
    print(f"received={len(seen)} lost={top - len(seen)} max_seq={top} gaps={shown}")
    return 0


def udp_client(addr, port, seconds):
    s = socket.socket(family(addr), socket.SOCK_DGRAM)
    end = time.monotonic() + seconds
    seq = 0
    errors = {}
    while time.monotonic() < end and not STOP:
        seq += 1
        try:
            s.sendto(b"%d" % seq, (addr, port))
        except OSError as e:  # counted as lost by the server
            name = errno.errorcode.get(e.errno, str(e.errno))
            errors[name] = errors.get(name, 0) + 1
        time.sleep(0.01)
    shown = ",".join(f"{k}:{v}" for k, v in sorted(errors.items())) or "none"
    print(f"sent={seq} send_errors={shown}")
    return 0


def main(argv):
    cmd = argv[1]
    if cmd == "tcp-server":
        return tcp_server(int(argv[2]))
    if cmd == "tcp-client":
        return tcp_client(argv[2], int(argv[3]), float(argv[4]))
    if cmd == "udp-server":
        return udp_server(int(argv[2]), float(argv[3]))
    if cmd == "udp-client":
        return udp_client(argv[2], int(argv[3]), float(argv[4]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
