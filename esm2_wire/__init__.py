"""What the ESM-2 server and its clients share, free of torch: the generated gRPC stubs
(`esm2_wire.proto`), the vocabulary and request limits, the output kinds, the result of
one sequence, and the tensor-chunk codec of the streaming RPCs."""
