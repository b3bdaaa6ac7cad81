//! Counters for `GET /metrics` (Prometheus text format): requests by status, the queue,
//! tokens generated, and latency histograms. Atomics only: the handlers and the worker update
//! them without locks.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            if seconds <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

#[derive(Default)]
pub struct Metrics {
    /// Answered requests by status class: 2xx, 4xx, 429 (counted apart), 5xx.
    pub ok: AtomicU64,
    pub client_errors: AtomicU64,
    pub rejected_full: AtomicU64,
    pub server_errors: AtomicU64,
    /// Requests waiting for the worker.
    pub queued: AtomicU64,
    /// 1 while the worker answers a request.
    pub busy: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub audio_seconds_ms: AtomicU64,
    pub open_connections: AtomicU64,
    pub refused_connections: AtomicU64,
    /// From the end of the request body to the end of the answer.
    pub latency: Histogram,
    /// Time the worker spent on a request.
    pub generation: Histogram,
    /// Time to the first streamed text.
    pub first_token: Histogram,
    /// Times requests joined the running decode loop, and the requests that joined.
    pub joins: AtomicU64,
    pub joined_requests: AtomicU64,
    /// Requests decoding now, and the most decoding together so far.
    pub decoding: AtomicU64,
    pub decoding_peak: AtomicU64,
    /// Requests whose decoding stopped early because their client went away.
    pub cancelled: AtomicU64,
}

impl Metrics {
    pub fn count_status(&self, status: u16) {
        let counter = match status {
            429 => &self.rejected_full,
            400..=499 => &self.client_errors,
            500..=599 => &self.server_errors,
            _ => &self.ok,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// `joined` requests joined the decode loop, which now decodes `decoding` requests.
    pub fn observe_join(&self, joined: usize, decoding: usize) {
        self.joins.fetch_add(1, Ordering::Relaxed);
        self.joined_requests
            .fetch_add(joined as u64, Ordering::Relaxed);
        self.observe_decoding(decoding);
    }

    pub fn observe_decoding(&self, decoding: usize) {
        self.decoding.store(decoding as u64, Ordering::Relaxed);
        self.decoding_peak
            .fetch_max(decoding as u64, Ordering::Relaxed);
    }

    pub fn observe_generation(&self, seconds: f64) {
        self.generation.observe(seconds);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP earshot_requests_total Answered API requests by status class.\n# TYPE earshot_requests_total counter"
        );
        for (class, c) in [
            ("2xx", &self.ok),
            ("4xx", &self.client_errors),
            ("429", &self.rejected_full),
            ("5xx", &self.server_errors),
        ] {
            let _ = writeln!(
                out,
                "earshot_requests_total{{status=\"{class}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        for (name, help, kind, value) in [
            (
                "earshot_queue_depth",
                "Requests waiting for the model.",
                "gauge",
                self.queued.load(Ordering::Relaxed) as f64,
            ),
            (
                "earshot_busy",
                "1 while the model answers a request.",
                "gauge",
                self.busy.load(Ordering::Relaxed) as f64,
            ),
            (
                "earshot_open_connections",
                "Open client connections.",
                "gauge",
                self.open_connections.load(Ordering::Relaxed) as f64,
            ),
            (
                "earshot_refused_connections_total",
                "Connections closed at once because max-connections were open.",
                "counter",
                self.refused_connections.load(Ordering::Relaxed) as f64,
            ),
            (
                "earshot_cancelled_total",
                "Requests whose decoding stopped early because their client went away.",
                "counter",
                self.cancelled.load(Ordering::Relaxed) as f64,
            ),
            (
                "earshot_joins_total",
                "Times new requests joined the running decode loop (continuous batching).",
                "counter",
                self.joins.load(Ordering::Relaxed) as f64,
            ),
            (
                "earshot_joined_requests_total",
                "Requests that joined it (over joins: how many came together).",
                "counter",
                self.joined_requests.load(Ordering::Relaxed) as f64,
            ),
            (
                "earshot_decoding_requests",
                "Requests decoding together now (the batch size).",
                "gauge",
                self.decoding.load(Ordering::Relaxed) as f64,
            ),
            (
                "earshot_decoding_requests_peak",
                "The most requests decoding together so far.",
                "gauge",
                self.decoding_peak.load(Ordering::Relaxed) as f64,
            ),
            (
                "earshot_completion_tokens_total",
                "Tokens generated.",
                "counter",
                self.completion_tokens.load(Ordering::Relaxed) as f64,
            ),
            (
                "earshot_audio_seconds_total",
                "Seconds of audio received in answered requests.",
                "counter",
                self.audio_seconds_ms.load(Ordering::Relaxed) as f64 / 1e3,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        self.latency.write(
            &mut out,
            "earshot_request_seconds",
            "From the end of the request body to the end of the answer.",
        );
        self.generation.write(
            &mut out,
            "earshot_generation_seconds",
            "Time the model spent on a request.",
        );
        self.first_token.write(
            &mut out,
            "earshot_first_token_seconds",
            "Time to the first streamed text.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.latency.observe(0.07);
        m.latency.observe(3.0);
        m.count_status(200);
        m.count_status(429);
        m.count_status(413);
        let text = m.render();
        assert!(
            text.contains("earshot_request_seconds_bucket{le=\"0.05\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("earshot_request_seconds_bucket{le=\"0.1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("earshot_request_seconds_bucket{le=\"5\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("earshot_request_seconds_bucket{le=\"+Inf\"} 2"),
            "{text}"
        );
        assert!(text.contains("earshot_request_seconds_count 2"), "{text}");
        assert!(
            text.contains("earshot_requests_total{status=\"429\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("earshot_requests_total{status=\"4xx\"} 1"),
            "{text}"
        );
    }
}
