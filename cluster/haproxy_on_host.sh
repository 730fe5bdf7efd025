#!/bin/sh
# HAProxy as Ray Serve starts it (RAY_SERVE_HAPROXY_BINARY_PATH points here), with the two
# listeners Ray 2.60's configuration template binds to every interface (its stats page and
# its Prometheus exporter) bound to the cluster's own host instead, so that a cluster on
# loopback listens on loopback only (cluster/ingress.py). Ray rewrites the file before each
# start or reload, so it is edited on every start.
config=""
previous=""
for arg in "$@"; do
  [ "$previous" = "-f" ] && config="$arg"
  previous="$arg"
done
if [ -n "$config" ] && [ -f "$config" ]; then
  sed -i -E "s/^([[:space:]]*bind[[:space:]]+)\*?:([0-9]+)[[:space:]]*$/\1${CACHEOPT_HAPROXY_HOST}:\2/" "$config"
fi
exec "$CACHEOPT_HAPROXY_BINARY" "$@"
