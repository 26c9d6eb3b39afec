"""kvstack: a gRPC key/value service (client, server, LMDB backend) and its deployment."""
