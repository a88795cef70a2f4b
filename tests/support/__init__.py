"""Test helpers, a module per concern; import from the module, not from here.

- ``net``: loopback ports, plain HTTP GETs, health waits, listening sockets, a chunked body,
  stand-in HTTP servers
- ``polling``: ``eventually``, the one poll-until-true
- ``processes``: ``increment-service`` run for real in a subprocess (``make_service``'s type)
- ``inprocess``: the service in this process: its test client's type, a replica behind a
  line-cutting proxy (the ``proxied`` fixture)
- ``load``: ``Traffic``, the one load generator, ``Sent``, its record of a request, and
  ``unexplained``, what the counters hold that the traffic does not explain
- ``postgres``: database URLs, the counters table, a throwaway cluster, a line-cutting proxy
- ``redis_server``: a redis-server of a test's own, which it may stop
- ``problems``: problem+json answers (``assert_problem``, ``problem_type``)
- ``metrics``: samples of a Prometheus exposition, scraped or of an in-process app
- ``logs``: JSON log lines, and the service's flushes in them
- ``monitoring``: prometheus/ and grafana-provisioning/, the dashboard's queries
- ``compose``: docker-compose.yml read and interpolated as compose does
- ``dockerfile``: the Dockerfile's instructions by stage, .dockerignore
- ``k8s``: deploy/k8s's manifests and the app's container
- ``service_settings``: every documented setting with its default, the Settings class
- ``nginx``: the native load balancer's configuration and process
- ``topology``: compose's stack as local processes

The benchmark (bench/) shares ``net``, ``postgres`` and ``processes``.
"""
