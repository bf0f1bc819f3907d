"""Certificates and identities of a deployment, shared by the daemons and the MPC mesh.

:mod:`~secfwt.pki.identity` is the naming contract (a role and a party id, carried in a
certificate's SAN names); :mod:`~secfwt.pki.certs` issues and checks the files
(``secfwt certs init|issue``). Both the party daemons (:mod:`secfwt.server`) and the TLS
transport (:mod:`secfwt.mpc.transport`) use them, so this package imports neither.
"""
