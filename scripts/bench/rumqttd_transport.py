"""rumqttd config for one transport row of scripts/bench.sh: its v4 server (equal limits,
scripts/bench/rumqttd.toml.in) with a [tls] table (tls), or the same settings as its
WebSocket server (ws; wss adds the [tls] table). rumqttd serves WebSocket with v4 only.

    rumqttd_transport.py SRC_V4_TOML DST tls|ws|wss TLS_DIR
"""
import sys

src, dst, transport, tls_dir = sys.argv[1:]
conf = open(src).read()
section = "v4.1"
if transport in ("ws", "wss"):
    conf = (conf.replace("[v4.1]", "[ws.1]")
            .replace("[v4.1.connections]", "[ws.1.connections]")
            .replace('name = "v4-1"', 'name = "ws-1"'))
    section = "ws.1"
if transport in ("tls", "wss"):
    table = (f'    [{section}.tls]\n    certpath = "{tls_dir}/server.pem"\n'
             f'    keypath = "{tls_dir}/server.key"\n')
    marker = f"    [{section}.connections]"
    if marker not in conf:
        sys.exit(f"{src}: no {marker} table")
    conf = conf.replace(marker, table + marker, 1)
open(dst, "w").write(conf)
