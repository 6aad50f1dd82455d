#!/bin/sh
# The test image of `berth watch` (crates/berth/tests/watch.rs): busybox
# httpd serving the operations guide's health JSON, with faults the test
# chooses through the environment (baked into a tag, or set by the spec):
#   FAULT=exit            exit at once with status 3
#   FAULT=unhealthy       the health endpoint answers 503
#   REPORT_VERSION=V      report image_version V instead of $VERSION
#   UNHEALTHY_AFTER=N     healthy for N seconds after the start, then 503
#   EXIT_AFTER=N          serve for N seconds, then exit with status 4
#   ERROR_PCT=P           /app answers 500 to P % of requests (at random)
#   ERROR_EVERY=N         /app answers 500 to exactly every Nth request
#   LATENCY_MS=M          /app answers after M ms
# /cgi-bin/metrics exports what /app counted, for Prometheus.
if [ "$FAULT" = exit ]; then
    echo "fault: exiting at once" >&2
    exit 3
fi
# Centiseconds since boot: the fault's time to 10 ms, not to the second.
read up _ < /proc/uptime
echo "${up%.*}${up#*.}" > /tmp/started
for v in VERSION FAULT REPORT_VERSION UNHEALTHY_AFTER ERROR_PCT ERROR_EVERY LATENCY_MS EXIT_AFTER; do
    eval "val=\${$v}"
    echo "$v='$val'"
done > /tmp/fault.env
echo "version $VERSION serving on :80"
if [ -n "$EXIT_AFTER" ]; then
    /bin/busybox httpd -p 80 -h /www
    /bin/busybox sleep "$EXIT_AFTER"
    echo "fault: exiting after $EXIT_AFTER s" >&2
    exit 4
fi
exec /bin/busybox httpd -f -p 80 -h /www
