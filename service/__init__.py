"""ESM-2 inference service: gRPC front end, batching scheduler, one model worker."""
