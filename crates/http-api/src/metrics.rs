//! Prometheus metrics through the `metrics` crate, recorded into a recorder owned by the
//! router's state (never the process-global one), so several servers, or parallel tests, in
//! one process keep separate numbers.

use agent_session::service::ServiceStats;
use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use std::fmt;

static META: Metadata<'static> = Metadata::new("http_api", Level::INFO, Some(module_path!()));

const SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
const RATE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0,
];

/// Every metric this crate exports, with its kind, unit and help text.
const DESCRIPTIONS: &[(&str, char, Option<Unit>, &str)] = &[
    ("semantic_http_requests_total", 'c', None, "HTTP requests by route, method and status."),
    ("semantic_http_request_duration_seconds", 'h', Some(Unit::Seconds), "HTTP request duration (for streams: until the headers), by route."),
    ("semantic_generations_total", 'c', None, "Generations started, by API and cache tier."),
    ("semantic_generation_errors_total", 'c', None, "Generations that failed before or during streaming, by API and kind."),
    ("semantic_ttft_seconds", 'h', Some(Unit::Seconds), "Time from request to first answer token, by API and cache tier."),
    ("semantic_prompt_seconds", 'h', Some(Unit::Seconds), "Time from request to the prompt being processed (restore + prefill), by cache tier; tier=\"warm\" is the restore path."),
    ("semantic_decode_tokens_per_second", 'h', None, "Decode speed of each generation (tokens after the first / time after the first)."),
    ("semantic_cache_turns_total", 'c', None, "Turns by where the reused prompt came from (hot, warm, miss)."),
    ("semantic_cache_reused_tokens_total", 'c', None, "Prompt tokens reused from the cache."),
    ("semantic_prefilled_tokens_total", 'c', None, "Prompt tokens computed."),
    ("semantic_generated_tokens_total", 'c', None, "Answer tokens generated."),
    ("semantic_cache_restored_bytes_total", 'c', Some(Unit::Bytes), "Bytes of KV restored from the store."),
    ("semantic_restore_seconds", 'h', Some(Unit::Seconds), "Time to load and import a warm prefix from the store."),
    ("semantic_queue_wait_seconds", 'h', Some(Unit::Seconds), "Time each admitted generation waited in the admission queue for a running slot."),
    ("semantic_hot_evictions_total", 'c', None, "Agents' KV evicted from RAM to make room."),
    ("semantic_service_requests_total", 'c', None, "Generations finished or cancelled by the service."),
    ("semantic_decode_steps_total", 'c', None, "Batched decode steps (one engine call each)."),
    ("semantic_decode_step_sequences_total", 'c', None, "Sequences served by batched decode steps, summed (divided by semantic_decode_steps_total: the mean batch size)."),
    ("semantic_decode_batch_max", 'g', None, "Largest decode batch so far."),
    ("semantic_decode_batch_size", 'g', None, "Generations in their decode phase now (the current decode batch)."),
    ("semantic_requests_active", 'g', None, "Generations running now."),
    ("semantic_requests_queued", 'g', None, "Generations waiting for a slot."),
    ("semantic_requests_prefilling", 'g', None, "Running generations processing their prompt (restore and prefill), before their first token."),
    ("semantic_hot_pool_blocks_used", 'g', None, "Hot-tier KV blocks in use (idle sessions and running requests)."),
    ("semantic_hot_pool_blocks_total", 'g', None, "Hot-tier capacity in KV blocks."),
    ("semantic_hot_pool_blocks_active", 'g', None, "Hot-tier KV blocks reserved by running requests."),
    ("semantic_hot_pool_utilization_ratio", 'g', None, "Hot-tier blocks reserved by running requests / capacity."),
    ("semantic_hot_agents", 'g', None, "Agents with KV in RAM."),
    ("semantic_store_blocks", 'g', None, "KV blocks in the store."),
    ("semantic_store_bytes", 'g', Some(Unit::Bytes), "Bytes of KV blocks in the store."),
    ("semantic_store_agents", 'g', None, "Agent manifests in the store."),
    ("semantic_store_blocks_written_total", 'c', None, "Blocks written to the store."),
    ("semantic_store_blocks_read_total", 'c', None, "Blocks read from the store."),
    ("semantic_store_bytes_read_total", 'c', Some(Unit::Bytes), "Bytes read from the store."),
    ("semantic_store_quarantined_total", 'c', None, "Corrupt or foreign store entries quarantined."),
    ("semantic_store_evicted_blocks_total", 'c', None, "Blocks deleted by the store's disk budget."),
    ("semantic_store_write_errors_total", 'c', None, "Block writes that failed in the store's background writer (logged with the block and the cause)."),
    ("semantic_object_store_up", 'g', None, "1 while the shared object-store tier answers, 0 while it is down (turns are then served from RAM and the local disk). Absent without a shared tier."),
    ("semantic_object_store_upload_queue", 'g', None, "Blocks and manifests waiting to be uploaded to the object store."),
    ("semantic_object_store_outages_total", 'c', None, "Times the object store became unreachable or too slow."),
    ("semantic_object_store_errors_total", 'c', None, "Object-store requests that failed or timed out."),
    ("semantic_object_store_uploaded_blocks_total", 'c', None, "Blocks uploaded to the object store."),
    ("semantic_object_store_uploaded_bytes_total", 'c', Some(Unit::Bytes), "Bytes of blocks uploaded to the object store."),
    ("semantic_object_store_downloaded_blocks_total", 'c', None, "Blocks downloaded (and verified) from the object store."),
    ("semantic_object_store_downloaded_bytes_total", 'c', Some(Unit::Bytes), "Bytes of blocks downloaded from the object store."),
    ("semantic_object_store_stale_manifests_total", 'c', None, "Manifest uploads refused because the object store had a newer turn of the agent."),
    ("semantic_persist_failures_total", 'c', None, "Turns whose cache (blocks or agent manifest) could not be persisted (logged with the agent and the cause)."),
    ("semantic_connections_open", 'g', None, "Open client connections."),
    ("semantic_connections_limited_total", 'c', None, "Times the connection limit was reached (new connections then wait in the listen backlog)."),
];

/// The metrics of one router: a Prometheus recorder and the handle that renders it.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh recorder with histogram buckets for the latency and rate metrics.
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("semantic_decode_tokens_per_second".into()),
                    RATE_BUCKETS,
                )
            })
            // Only fails for empty bucket lists, which the constants are not; the fallback
            // renders summaries instead of histograms.
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        for (name, kind, unit, help) in DESCRIPTIONS {
            let key = (*name).into();
            let help = (*help).into();
            match kind {
                'c' => recorder.describe_counter(key, *unit, help),
                'g' => recorder.describe_gauge(key, *unit, help),
                _ => recorder.describe_histogram(key, *unit, help),
            }
        }
        let handle = recorder.handle();
        Self { recorder, handle }
    }

    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.to_string()))
            .collect();
        Key::from_parts(name, labels)
    }

    /// A counter handle.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder
            .register_counter(&Self::key(name, labels), &META)
    }

    /// A gauge handle.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder
            .register_gauge(&Self::key(name, labels), &META)
    }

    /// A histogram handle.
    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder
            .register_histogram(&Self::key(name, labels), &META)
    }

    /// Copies the service's counters into the recorder and renders the Prometheus text.
    pub fn render(&self, stats: &ServiceStats) -> String {
        for (tier, v) in [
            ("hot", stats.hits_hot),
            ("warm", stats.hits_warm),
            ("miss", stats.misses),
        ] {
            self.counter("semantic_cache_turns_total", &[("tier", tier)])
                .absolute(v);
        }
        let counters = [
            ("semantic_cache_reused_tokens_total", stats.reused_tokens),
            ("semantic_prefilled_tokens_total", stats.prefilled_tokens),
            ("semantic_generated_tokens_total", stats.generated_tokens),
            ("semantic_cache_restored_bytes_total", stats.restored_bytes),
            ("semantic_hot_evictions_total", stats.evictions),
            ("semantic_service_requests_total", stats.requests),
            ("semantic_decode_steps_total", stats.decode_steps),
            (
                "semantic_decode_step_sequences_total",
                stats.decode_step_sequences,
            ),
            (
                "semantic_store_blocks_written_total",
                stats.store.blocks_written,
            ),
            ("semantic_store_blocks_read_total", stats.store.blocks_read),
            ("semantic_store_bytes_read_total", stats.store.bytes_read),
            ("semantic_store_quarantined_total", stats.store.quarantined),
            ("semantic_store_evicted_blocks_total", stats.store.evicted),
            (
                "semantic_store_write_errors_total",
                stats.store.write_errors,
            ),
            ("semantic_persist_failures_total", stats.persist_failures),
        ];
        for (name, v) in counters {
            self.counter(name, &[]).absolute(v);
        }
        let gauges = [
            ("semantic_requests_active", stats.active as f64),
            ("semantic_requests_queued", stats.queued as f64),
            ("semantic_requests_prefilling", stats.prefilling as f64),
            ("semantic_decode_batch_size", stats.decoding as f64),
            (
                "semantic_hot_pool_blocks_used",
                stats.hot_blocks_used as f64,
            ),
            (
                "semantic_hot_pool_blocks_total",
                stats.hot_blocks_total as f64,
            ),
            (
                "semantic_hot_pool_blocks_active",
                stats.hot_blocks_active as f64,
            ),
            (
                "semantic_hot_pool_utilization_ratio",
                pool_utilization(stats),
            ),
            ("semantic_hot_agents", stats.hot_agents as f64),
            ("semantic_decode_batch_max", stats.max_decode_batch as f64),
            ("semantic_store_blocks", stats.store.blocks as f64),
            ("semantic_store_bytes", stats.store.bytes as f64),
            ("semantic_store_agents", stats.store.agents as f64),
        ];
        for (name, v) in gauges {
            self.gauge(name, &[]).set(v);
        }
        if let Some(r) = &stats.store.remote {
            self.gauge("semantic_object_store_up", &[])
                .set(if r.up { 1.0 } else { 0.0 });
            self.gauge("semantic_object_store_upload_queue", &[])
                .set(r.upload_queue as f64);
            for (name, v) in [
                ("semantic_object_store_outages_total", r.outages),
                ("semantic_object_store_errors_total", r.errors),
                (
                    "semantic_object_store_uploaded_blocks_total",
                    r.blocks_uploaded,
                ),
                (
                    "semantic_object_store_uploaded_bytes_total",
                    r.bytes_uploaded,
                ),
                (
                    "semantic_object_store_downloaded_blocks_total",
                    r.blocks_downloaded,
                ),
                (
                    "semantic_object_store_downloaded_bytes_total",
                    r.bytes_downloaded,
                ),
                (
                    "semantic_object_store_stale_manifests_total",
                    r.stale_manifests,
                ),
            ] {
                self.counter(name, &[]).absolute(v);
            }
        }
        self.handle.render()
    }
}

/// Hot-tier blocks reserved by running requests / capacity (0 when there is no capacity).
/// Idle agents' blocks do not count: they are evicted whenever a request needs room.
pub(crate) fn pool_utilization(stats: &ServiceStats) -> f64 {
    if stats.hot_blocks_total == 0 {
        0.0
    } else {
        stats.hot_blocks_active as f64 / stats.hot_blocks_total as f64
    }
}
