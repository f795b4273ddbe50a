"""Being watched while running: the snapshot of what the daemon does, the health verdict, the
status endpoint (``/healthz``, ``/status``, ``/metrics``) and systemd notifications."""
