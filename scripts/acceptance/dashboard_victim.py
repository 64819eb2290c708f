#!/usr/bin/env python3
"""The client that scripts/acceptance/dashboard.sh kicks from the dashboard: connects with
MQTT 5 (paho-mqtt 2.x, clean start, no session expiry), subscribes to one filter so its row
shows a subscription, then stays connected (answering keep-alive, never reconnecting) until
the broker disconnects it or --timeout passes. Writes one line to --out: the reason code of
the DISCONNECT it got, in decimal, and its name ("152 Administrative action [DISCONNECT from
the broker]"; a connection closed without DISCONNECT shows paho's own code and "[no DISCONNECT
packet]"), or
"none timeout" / "none connect-failed <why>". Creates --ready once CONNACK accepted it.

    dashboard_victim.py --port 1883 --client-id dash-victim --out reason.txt --ready ready
"""

import argparse
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--client-id", default="dash-victim")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ready", required=True)
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()

    state = {"done": False, "result": "none timeout"}

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            state.update(done=True, result=f"none connect-failed {reason_code.value} {reason_code}")
            return
        client.subscribe("dash/victim/#", qos=1)
        open(args.ready, "w").close()

    def on_disconnect(client, userdata, flags, reason_code, properties):
        why = getattr(properties, "ReasonString", None) if properties is not None else None
        origin = "DISCONNECT from the broker" if flags.is_disconnect_packet_from_server else "no DISCONNECT packet"
        state.update(done=True, result=f"{reason_code.value} {reason_code} [{origin}]" + (f" ({why})" if why else ""))

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=args.client_id,
                         protocol=mqtt.MQTTv5)
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    deadline = time.monotonic() + args.timeout
    try:
        client.connect(args.host, args.port, keepalive=30)
        # loop() by hand, not loop_forever()/loop_start(): those reconnect after a disconnect.
        while not state["done"] and time.monotonic() < deadline:
            client.loop(timeout=0.2)
    except OSError as e:
        state["result"] = f"none connect-failed {e}"
    with open(args.out, "w") as f:
        f.write(state["result"] + "\n")
    print(f"dashboard_victim: {state['result']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
