"""Deploying fedmeta across institutions with Flower's deployment runtime.

* ``federation.py``: the federation file (sites, SuperLink address, certificate names).
* ``pki.py``: the federation CA, the SuperLink TLS certificate, SuperNode keys.
* ``kits.py``: ``fedmeta provision`` -- one kit per site and one for the coordinator.
* ``templates.py``: the start scripts, READMEs, node config and manifest template.
* ``node.py``: ``fedmeta node init`` and ``fedmeta node check`` for a site directory.
* ``cli.py``: the commands, mounted by ``fedmeta/cli.py``.

Secure by default: the scripts start TLS and SuperNode authentication; insecure
mode is only ever chosen by passing ``--insecure``. The guide is ``docs/deploy.md``.
"""
