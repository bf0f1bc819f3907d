"""gRPC services behind the party daemons: arrive with issue #3."""
