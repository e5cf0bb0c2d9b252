//! The access log: one line per request and per TCP connection, written when it completes, as
//! JSON or as `key=value` text, to stdout or a file. Lines go through a bounded queue to a
//! writer thread (tracing-appender's non-blocking writer), so a slow disk never stalls the data
//! plane; when the queue is full, lines are dropped and counted
//! (`quicmesh_access_log_dropped_total`).

use std::borrow::Cow;
use std::io::Write;

use serde::Serialize;
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};

use crate::telemetry::metrics as m;

pub use crate::config::{AccessLogConfig, Format, Output};

/// One completed request or TCP connection. Field names are the log's keys.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Entry {
    /// Start, RFC 3339 with milliseconds.
    pub time: String,
    /// `outbound`, `inbound` or `ingress` (requests); `tcp-outbound`, `tcp-inbound` (tunnels).
    pub direction: &'static str,
    pub request_id: String,
    pub trace_id: String,
    /// Service and route names (`src_service`, `dst_service`, `route`): borrowed when they
    /// are the fixed `unknown` or `none`, which most requests carry (no allocation on every
    /// request's path).
    #[serde(rename = "src.service")]
    pub src_service: Cow<'static, str>,
    #[serde(rename = "src.node")]
    pub src_node: String,
    #[serde(rename = "dst.service")]
    pub dst_service: Cow<'static, str>,
    #[serde(rename = "dst.node")]
    pub dst_node: String,
    pub route: Cow<'static, str>,
    /// The matched rule's name, when it has one.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub rule: String,
    /// The instance address the request went to.
    pub endpoint: String,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub status: u16,
    /// The `quicmesh-error` reason when the proxy answered itself.
    pub error: String,
    /// A route's JWT check: `ok` or why it failed (`missing`, `expired`, ...); never the token.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub auth: &'static str,
    pub retries: u32,
    pub duration_ms: f64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

impl Entry {
    fn render(&self, format: Format) -> String {
        match format {
            Format::Json => serde_json::to_string(self).unwrap_or_default(),
            Format::Text => {
                let v = serde_json::to_value(self).unwrap_or_default();
                let Some(map) = v.as_object() else { return String::new() };
                let fields: Vec<String> = map
                    .iter()
                    .map(|(k, v)| match v {
                        serde_json::Value::String(s) if s.is_empty() => format!("{k}=-"),
                        serde_json::Value::String(s) if s.contains([' ', '"', '=']) => format!("{k}={s:?}"),
                        serde_json::Value::String(s) => format!("{k}={s}"),
                        other => format!("{k}={other}"),
                    })
                    .collect();
                fields.join(" ")
            }
        }
    }
}

/// Now, RFC 3339 with milliseconds (the `time` field).
pub fn timestamp() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Lines waiting for the writer thread; past this, new lines are dropped.
const QUEUE: usize = 8192;

/// A running access log: lines go to tracing-appender's non-blocking writer (a bounded queue and
/// a writer thread that flushes each batch), in its lossy mode.
pub struct AccessLog {
    writer: NonBlocking,
    format: Format,
    /// Flushes what is queued when the log is dropped (at exit).
    _flush: WorkerGuard,
}

impl AccessLog {
    /// Starts the writer; `None` when the log is off. A file that cannot be opened is an error.
    pub fn start(config: &AccessLogConfig) -> std::io::Result<Option<AccessLog>> {
        let builder = NonBlockingBuilder::default().lossy(true).buffered_lines_limit(QUEUE).thread_name("access-log");
        let (writer, flush) = match config.output {
            Output::Off => return Ok(None),
            Output::Stdout => builder.finish(std::io::stdout()),
            Output::File => {
                let path = config.path.clone().unwrap_or_default();
                builder.finish(std::fs::OpenOptions::new().create(true).append(true).open(path)?)
            }
        };
        Ok(Some(AccessLog { writer, format: config.format, _flush: flush }))
    }

    pub fn log(&self, entry: &Entry) {
        let mut line = entry.render(self.format);
        line.push('\n');
        // One write is one queued line; a full queue drops it and counts it.
        let _ = self.writer.clone().write_all(line.as_bytes());
        let dropped = self.writer.error_counter().dropped_lines();
        if dropped > 0 {
            metrics::counter!(m::ACCESS_LOG_DROPPED).absolute(dropped as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lines_quote_what_needs_it() {
        let e = Entry { direction: "outbound", path: "/a b".into(), status: 200, ..Default::default() };
        let line = e.render(Format::Text);
        assert!(line.contains("direction=outbound"), "{line}");
        assert!(line.contains("path=\"/a b\""), "{line}");
        assert!(line.contains("status=200") && line.contains("request_id=-"), "{line}");
        let json: serde_json::Value = serde_json::from_str(&e.render(Format::Json)).unwrap();
        assert_eq!(json["src.service"], "");
        assert_eq!(json["status"], 200);
    }
}
