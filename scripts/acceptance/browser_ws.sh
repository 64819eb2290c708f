#!/usr/bin/env bash
# MQTT over WebSocket from a real browser: headless Chromium (driven by puppeteer-core over
# the DevTools protocol) opens a page that loads MQTT.js (npm `mqtt`, its browser bundle),
# connects to ringmq's ws listener, subscribes, publishes and shows the round trip; the
# script waits for the page's text and keeps a screenshot (target/acceptance/browser-ws.png).
#
#   scripts/acceptance/browser_ws.sh [--broker target/release/ringmq] [--port 19880]
#
# Installs chromium (apt-get), MQTT.js and puppeteer-core (npm, in target/acceptance-node)
# when missing.
# Exit status 0 when the page shows the round trip.
set -u -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BROKER="$ROOT/target/release/ringmq"
PORT=19880
while [ $# -gt 0 ]; do
    case "$1" in
        --broker) BROKER="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        *) echo "browser_ws.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
# shellcheck source=chromium.sh
source "$ROOT/scripts/acceptance/chromium.sh" browser-ws
NODE_DIR="$ROOT/target/acceptance-node"
if [ ! -f "$NODE_DIR/node_modules/mqtt/dist/mqtt.min.js" ] || [ ! -f "$NODE_DIR/node_modules/puppeteer-core/package.json" ]; then
    mkdir -p "$NODE_DIR" &&
        (cd "$NODE_DIR" && npm install --silent --no-audit --no-fund mqtt@5 puppeteer-core@22 >/dev/null 2>&1)
fi
[ -f "$NODE_DIR/node_modules/mqtt/dist/mqtt.min.js" ] || { echo "FAIL browser-ws: MQTT.js missing"; exit 1; }
[ -f "$NODE_DIR/node_modules/puppeteer-core/package.json" ] || { echo "FAIL browser-ws: puppeteer-core missing"; exit 1; }

WORK=$(mktemp -d)
OUT="$ROOT/target/acceptance"
mkdir -p "$OUT"
cp "$NODE_DIR/node_modules/mqtt/dist/mqtt.min.js" "$WORK/"
cat > "$WORK/page.html" <<HTML
<!doctype html>
<html><head><meta charset="utf-8"><title>ringmq over WebSocket</title>
<script src="mqtt.min.js"></script></head>
<body style="font: 20px sans-serif; padding: 20px">
<h1>ringmq: MQTT over WebSocket from a browser</h1>
<p id="result">connecting to ws://127.0.0.1:$PORT/mqtt ...</p>
<script>
  const out = document.getElementById('result');
  const client = mqtt.connect('ws://127.0.0.1:$PORT/mqtt', { clientId: 'browser-' + Date.now(), reconnectPeriod: 0 });
  client.on('connect', () => {
    out.textContent = 'connected; subscribing';
    client.subscribe('browser/#', { qos: 1 }, () => client.publish('browser/hello', 'hello from chromium', { qos: 1 }));
  });
  client.on('message', (topic, payload) => {
    out.textContent = 'round trip ok: ' + topic + ' "' + payload + '"';
  });
  client.on('error', (e) => { out.textContent = 'error: ' + e.message; });
</script></body></html>
HTML

"$BROKER" --bind 127.0.0.1:0 --ws-bind "127.0.0.1:$PORT" --cores 2 --in-memory > "$WORK/broker.log" 2>&1 &
BROKER_PID=$!
trap 'kill $BROKER_PID 2>/dev/null; wait $BROKER_PID 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do
    (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
done
cat > "$WORK/drive.js" <<'JS'
const puppeteer = require(process.env.NODE_DIR + '/node_modules/puppeteer-core');
(async () => {
  const browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM, headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--allow-file-access-from-files'],
  });
  const page = await browser.newPage();
  await page.setViewport({ width: 900, height: 300 });
  await page.goto('file://' + process.env.WORK + '/page.html');
  let text = '';
  try {
    await page.waitForFunction(
      () => document.getElementById('result').textContent.startsWith('round trip ok'), { timeout: 20000 });
  } finally {
    text = await page.$eval('#result', (e) => e.textContent);
    await page.screenshot({ path: process.env.SHOT });
    await browser.close();
    console.log(text);
  }
})().catch((e) => { console.log('driver error: ' + e.message); process.exit(1); });
JS
RESULT=$(NODE_DIR="$NODE_DIR" CHROMIUM="$CHROMIUM" WORK="$WORK" SHOT="$OUT/browser-ws.png" timeout 90 node "$WORK/drive.js" | tail -1)
if [ "$RESULT" = 'round trip ok: browser/hello "hello from chromium"' ]; then
    echo "PASS browser-ws: the page shows: $RESULT (screenshot: $OUT/browser-ws.png)"
    exit 0
fi
echo "FAIL browser-ws: the page shows: $RESULT"
tail -5 "$WORK/broker.log"
exit 1
