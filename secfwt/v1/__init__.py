"""Generated gRPC stubs of the party daemon protocol ``secfwt.v1`` (protos/secfwt/v1/*.proto).

Do not edit the ``*_pb2*`` files: change the .proto and run ``make protos``; CI runs
``make check-protos`` to prove they are current.
"""
