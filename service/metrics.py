"""Prometheus metrics (prometheus-client), served on --metrics-port."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

QUEUE_DEPTH = Gauge("esm_queue_items", "Work items waiting for a batch, all models")
WORKER_BUSY = Gauge("esm_worker_busy", "Model workers running a batch now, all models (0 to the number of workers)")
WORKER_BATCHES = Counter("esm_worker_batches_total", "Batches run, per model worker", ["worker", "device"])
WORKER_SECONDS = Counter("esm_worker_seconds_total", "Time spent running batches, per model worker", ["worker", "device"])
REJECTED = Counter("esm_rejected_requests_total", "Requests refused because the queue was full")
ADMISSION_REFUSED = Counter(
    "esm_admission_refused_total",
    "Requests refused before any model work by their estimated work (service.engine.policy.admit), by verdict",
    ["model", "verdict"])
DROPPED = Counter("esm_dropped_items_total", "Queued items dropped before reaching the model", ["reason"])
BATCHES = Counter("esm_batches_total", "Batches run by the model worker", ["model"])
ITEMS = Counter("esm_items_total", "Items run by the model worker", ["model"])
RESIDUES = Counter("esm_residues_total", "Residues (BOS/EOS excluded) run by the model worker", ["model"])
PADDED_TOKENS = Counter("esm_padded_tokens_total", "Batch size x longest item, summed over batches", ["model"])
BATCH_SECONDS = Histogram(
    "esm_batch_seconds", "Model worker time per batch", ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BATCH_SIZE = Histogram("esm_batch_items", "Items per batch", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128))
INTERLEAVED_BATCHES = Counter("esm_interleaved_batches_total",
                              "Batches run between the layers of a longer batch on the same worker")
# Device memory: the start-up check's estimate per device (memory_budget) and, on CUDA, the most
# the caching allocator has handed out at once since start-up: the estimate's margin, measured.
DEVICE_MEMORY_ESTIMATE = Gauge("esm_device_memory_estimate_bytes",
                               "What the start-up check estimated the models on a device need", ["device"])
DEVICE_MEMORY_PEAK = Gauge("esm_device_memory_peak_bytes",
                           "The most device memory allocated at once since start-up (CUDA devices)", ["device"])
CACHE_HITS = Counter("esm_cache_hits_total", "Items answered from the result cache")
CACHE_MISSES = Counter("esm_cache_misses_total", "Items looked up in the result cache and not found")
CACHE_MERGED = Counter("esm_cache_merged_total", "Items that joined an identical item already queued or running")
CACHE_EVICTIONS = Counter("esm_cache_evictions_total", "Results evicted from the cache to keep its byte bound")
CACHE_BYTES = Gauge("esm_cache_bytes", "Bytes of results held by the result cache")
CACHE_ENTRIES = Gauge("esm_cache_entries", "Results held by the result cache")
REQUESTS = Counter("esm_requests_total",
                   "RPCs finished, by status: CANCELLED counts calls the caller cancelled or reset (a stream too, "
                   "while blocked on its reader), RESOURCE_EXHAUSTED streams ended for a slow reader too",
                   ["method", "code"])
JSON_BYTES_IN_FLIGHT = Gauge("esm_json_response_bytes_in_flight",
                             "Estimated bytes of the JSON responses admitted and not yet handed to the gateway "
                             "(bounded by --json-response-budget-mb)")
RESPONSE_BYTES_HELD = Gauge("esm_response_bytes_held",
                            "Bytes of results and rendered responses held for callers that have not received them yet")
# What the server may use, read at start-up (service.cgroup_limits; docs/deploy.md, "Container limits").
MEMORY_LIMIT = Gauge("esm_memory_limit_bytes",
                     "Memory this server may use: its cgroup's limit (memory.max, memory.limit_in_bytes), "
                     "else the host's total")
CPU_LIMIT = Gauge("esm_cpu_limit", "Whole CPUs this server may use: its cgroup's CPU quota or its affinity mask, "
                                   "the smaller")
TORCH_THREADS = Gauge("esm_torch_threads", "torch's intra-op threads (the CPU limit unless OMP_NUM_THREADS is set)")
REFUSED_UNDECODED = Counter(
    "esm_refused_undecoded_total", "Calls refused before their message was decoded (service.api.request_guard)", ["reason"]
)
IGNORED_TRACE_HEADERS = Counter(
    "esm_ignored_trace_headers_total",
    "Callers' W3C trace headers ignored (tracing on): a traceparent too long, malformed, of version ff or with a zero "
    "id starts a new trace; a tracestate too long is dropped (service/tracing.py)", ["reason"])
# The autoscaling signal (see docs/deploy.md): how long work waits for the model, which grows
# with load before latency targets are missed, whatever the sequence lengths.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
QUEUE_WAIT = Histogram(
    "esm_queue_wait_seconds", "Time an item waits from enqueue to the start of its batch", ["model"],
    buckets=_LATENCY_BUCKETS,
)
REQUEST_SECONDS = Histogram(
    "esm_request_seconds", "RPC time from arrival to the last response byte, by model", ["model", "method"],
    buckets=_LATENCY_BUCKETS,
)


def observe_queue_wait(batch, now: float) -> None:
    """Queue entries of one batch; `now` on their enqueued_at clock (time.monotonic)."""
    histogram = QUEUE_WAIT.labels(batch[0].input.model)
    for entry in batch:
        histogram.observe(max(0.0, now - entry.enqueued_at))


def observe_batch(batch, seconds: float) -> None:
    model = batch[0].model
    BATCHES.labels(model).inc()
    ITEMS.labels(model).inc(len(batch))
    RESIDUES.labels(model).inc(sum(item.length - 2 for item in batch))
    PADDED_TOKENS.labels(model).inc(len(batch) * max(item.length for item in batch))
    BATCH_SECONDS.labels(model).observe(seconds)
    BATCH_SIZE.labels(model).observe(len(batch))
