"""Deploying fedmeta across institutions with Flower's deployment runtime.

* ``federation.py``: the federation file (sites, SuperLink address, certificate names).
* ``pki.py``: the federation CA, the SuperLink TLS certificate, SuperNode keys.
* ``kits.py``: ``fedmeta provision`` -- one kit per site and one for the coordinator.
* ``templates.py``: the start scripts, READMEs, node config and manifest template.
* ``node.py``: ``fedmeta node init`` (the site's keys are born here) and ``node check``.
* ``request.py``: a site's request file (public keys and a CSR) for the provisioner.
* ``proxy.py`` + ``nginx.conf.j2``: the coordinator's nginx front (Fleet API only, mTLS).
* ``supernode.py``: ``fedmeta node supernode``, flower-supernode with a TLS client cert.
* ``registry.py``: ``state/node-ids.txt`` kept in step with the SuperLink's nodes.
* ``binding.py``: the ServerApp maps nodes to sites from that registry.
* ``cli.py``: the commands, mounted by ``fedmeta/cli.py``.

Secure by default: the scripts start TLS and SuperNode authentication; insecure
mode is only ever chosen by passing ``--insecure``. The guide is ``docs/deploy.md``.
"""
