#!/usr/bin/env bash
# Scrapes a broker's Prometheus endpoint once a second until FILE disappears, as a real
# Prometheus would; prints how many scrapes were tried and answered. For A/B runs of the
# HTTP endpoint's cost:
#
#   touch /tmp/scrape.on; scripts/bench/scrape_metrics.sh 127.0.0.1:18099 /tmp/scrape.on &
#   scripts/bench/ab.sh ... --b-args "--http-bind 127.0.0.1:18099"; rm /tmp/scrape.on
set -u
ADDR=${1:?usage: scrape_metrics.sh HOST:PORT FILE}
FLAG=${2:?usage: scrape_metrics.sh HOST:PORT FILE}
tried=0; answered=0
while [ -f "$FLAG" ]; do
    if curl -sf -o /dev/null --max-time 2 "http://$ADDR/metrics"; then answered=$((answered + 1)); fi
    tried=$((tried + 1))
    sleep 1
done
echo "scrapes tried $tried, answered $answered"
