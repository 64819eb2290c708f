# Sourced by the browser checks (browser_ws.sh, dashboard.sh): sets CHROMIUM to a headless
# Chromium, installing Debian's package when missing; exits with a FAIL line naming $1 when
# it cannot.
CHROMIUM=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$CHROMIUM" ]; then
    echo "# installing chromium (apt-get)"
    apt-get install -y chromium >/dev/null 2>&1 || { apt-get update >/dev/null 2>&1 && apt-get install -y chromium >/dev/null 2>&1; }
    CHROMIUM=$(command -v chromium || true)
    [ -n "$CHROMIUM" ] || { echo "FAIL $1: chromium could not be installed"; exit 1; }
fi
