"""What every hotslot service runs on: settings, logging, tracing, the error-mapping interceptor and the gRPC server
with health, reflection and graceful shutdown. Import the submodules; this package re-exports nothing."""
