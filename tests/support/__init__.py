"""Test helpers, a module per concern; import from the module, not from here.

- ``net``: loopback ports, plain HTTP GETs, health waits, listening sockets
- ``polling``: ``eventually``, the one poll-until-true
- ``processes``: ``increment-service`` run for real in a subprocess
- ``load``: ``Traffic``, the one load generator, and ``Sent``, its record of a request
- ``postgres``: database URLs, what is persisted, a throwaway cluster, a line-cutting proxy
- ``metrics``: samples of a Prometheus exposition
- ``logs``: JSON log lines
- ``compose``: docker-compose.yml read and interpolated as compose does
- ``nginx``: the native load balancer's configuration and process
- ``topology``: compose's stack as local processes

The benchmark (bench/) shares ``net`` and ``postgres``.
"""
