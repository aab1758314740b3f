"""`twistd` with Mail Control attached, for as long as epost/service.py does not attach it itself.

Used by test_browser.py only when `attach_admin` is not yet called by
make_service; once it is, the browser test runs the plain `twistd`.
"""

import dataclasses
import sys

import epost.service
from epost.web import attach_admin

_real = epost.service.make_service


def make_service(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    # Without its admin endpoints, so that only Mail Control (with /metrics) listens there.
    top = _real(dataclasses.replace(config, server=dataclasses.replace(config.server, admin=())), reactor)
    extra = {}
    try:
        from epost import metrics

        extra[b"metrics"] = metrics.metrics_resource()
    except (ImportError, AttributeError):
        pass
    top.admin_site = attach_admin(top, config, top.manager, top.routing, reactor, top.manager.pool, extra)
    return top


epost.service.make_service = make_service

if __name__ == "__main__":
    from twisted.scripts.twistd import run

    sys.argv[0] = "twistd"
    run()
