"""Operating both daemons: logging set-up, health and readiness, Prometheus metrics, systemd notifications.

logs.py        the one logging set-up (text or JSON lines), job/instance context, token redaction
health.py      the event-loop monitor (liveness) and the runner's readiness checks
metrics.py     the runner's metrics (counters fed by events, a collector reading state at scrape time)
http.py        the runner's small local HTTP endpoint: /healthz, /readyz, /metrics
coordinator.py the coordinator's /healthz, /readyz, /metrics and its scrape-time collector
sd_notify.py   READY=1 / WATCHDOG=1 / STOPPING=1 to systemd over NOTIFY_SOCKET
"""
