#!/usr/bin/env bash
# On the head node (ray up's head_setup_commands): Redis for the cluster's KV snapshots and
# reserve leases, with the password from ~/.cacheopt/redis-password, listening on loopback
# and on the head's private address. That address is what every replica is given
# (~/.cacheopt-redis-url, read by head_start_ray_commands): a loopback URL would send each
# worker's replicas to their own machine, where no Redis is (cluster/app.py refuses it).
# Open port 6379 to the workers only (security group, firewall).
set -euo pipefail
command -v redis-server >/dev/null || sudo apt-get install -y redis-server
IP=${CACHEOPT_REDIS_IP:-$(hostname -I | awk '{print $1}')}
PASSWORD=$(cat ~/.cacheopt/redis-password)
sudo sed -i -e '/^requirepass/d' -e "s/^bind .*/bind 127.0.0.1 $IP/" /etc/redis/redis.conf
echo "requirepass $PASSWORD" | sudo tee -a /etc/redis/redis.conf >/dev/null
sudo systemctl restart redis-server
(umask 077 && echo "redis://:$PASSWORD@$IP:6379/0" > ~/.cacheopt-redis-url)
