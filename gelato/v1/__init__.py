"""Generated protobuf/gRPC stubs for the v1 wire contract (proto/gelato/v1). Never edit by hand:
regenerate with `bash proto/generate.sh`; CI fails when they are stale."""
